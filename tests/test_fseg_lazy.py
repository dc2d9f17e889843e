"""A trial worker decodes cached evidence only: for fseg it never builds the LLM (LLaVA), only
SAM's prompt side that decode reads."""

from __future__ import annotations

import pytest

import methods.fseg.segmenter as fseg_segmenter
import search.core.trial as trial
from search.engine.plan import plan_search
from search.engine.search import search_context
from search.run import build_parser


def test_a_trial_worker_never_builds_the_llm_when_the_evidence_is_cached(workdir, monkeypatch):
    plan = plan_search(build_parser().parse_args(
        ["--method", "fseg", "--preset", "smoke", "--max-images", "2", "--rungs", "1"]))
    ctx = search_context(plan, "cpu")
    monkeypatch.setattr(trial, "_MEMO", {})
    for item in ctx.items:                       # the extraction task's work
        assert trial.extract_item(ctx, item)
    assert trial.get_segmenter(ctx).llava_built  # extract did need it

    monkeypatch.setattr(trial, "_MEMO", {})      # a fresh trial worker process
    built = []
    real = fseg_segmenter.load_llava
    monkeypatch.setattr(fseg_segmenter, "load_llava",
                        lambda *a, **k: built.append(1) or real(*a, **k))
    reports = []
    trial.evaluate(ctx, {}, reports.append)
    assert reports and reports[-1]["images"] == 2
    assert built == [] and not trial.get_segmenter(ctx).llava_built

    # A cache miss in that worker (an evicted entry) does build it, to extract.
    monkeypatch.setattr(trial, "_MEMO", {})
    for f in plan.cache_dir.rglob("*.safetensors"):
        f.unlink()
    trial.evaluate(ctx, {}, reports.append)
    assert built == [1]


def test_a_missing_llava_path_is_refused_before_anything_is_built(tmp_path):
    from methods.base import OvssError
    from methods.fseg.backbone import check_llava_spec

    with pytest.raises(OvssError, match="LLaVA path .*nope not found"):
        check_llava_spec({"name": "x", "arch": "llava", "path": str(tmp_path / "nope")})
