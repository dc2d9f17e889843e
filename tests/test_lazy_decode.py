"""A trial worker decodes cached evidence without the model: clipseg from its decode head (the
final block's out_proj, ln_post, proj; cached next to the evidence), pnp from evidence and
settings alone. Its label maps are those of the fully built segmenter; a cache miss, or a
missing or damaged head, builds the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import methods.clipseg.segmenter as clipseg_segmenter
import methods.pnp.segmenter as pnp_segmenter
import search.core.trial as trial
from methods.base import Evidence, OvssError
from search.core.cache import EvidenceCache
from search.core.space import full_params
from search.engine.plan import plan_search
from search.engine.search import search_context
from search.run import build_parser

#: Decode knobs of the clipseg smoke search (tiny ViT, 4 blocks): variants that read out_proj
#: (cra / kk_mid with dsi_start -1, naclip), its bias only (dsi_start -2..-4), neither (qk).
CLIPSEG_PARAMS = [
    {"attention": "cra", "layer": 2, "dsi_start": -1, "bg_threshold": 0.1},
    {"attention": "cra", "layer": 1, "dsi_start": -3, "tau": 5.0, "bg_threshold": 0.2},
    {"attention": "kk_mid", "layer": 3, "dsi_start": -1, "bg_threshold": 0.05},
    {"attention": "naclip", "gaussian_std": 2.0, "bg_threshold": 0.1},
    {"attention": "qk", "dsi_start": -2, "bg_threshold": 0.1},
]
#: Decode (and extension) knobs of the pnp smoke search (tiny BLIP, 3 layers, 2 heads).
PNP_PARAMS = [
    {"layer": 1, "head": 1, "drop_iters": 1, "threshold": 0.1, "sigma": 0.05},
    {"layer": 2, "head": 2, "drop_iters": 1, "threshold": 0.3, "sigma": 0.01},
    {"layer": 2, "head": 1, "drop_iters": 2, "threshold": 0.15, "sigma": 0.05},
    {"layer": 1, "head": 2, "drop_iters": 2, "threshold": 0.4, "sigma": 0.11},
]


def smoke_context(method: str, n: int = 3):
    plan = plan_search(build_parser().parse_args(
        ["--method", method, "--preset", "smoke", "--max-images", str(n), "--rungs", "1"]))
    return plan, search_context(plan, "cpu")


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of ``module.name`` (where the segmenter module looks it up)."""
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def label_maps(ctx, seg, params_list) -> list[list[np.ndarray]]:
    """Per param set, the label map of every image, decoded by ``seg`` on cached evidence."""
    out = []
    for p in params_list:
        knobs = full_params(ctx.defaults, p)
        out.append([np.asarray(seg.decode(trial.evidence_for(ctx, item, knobs), knobs))
                    for item in ctx.items])
    return out


def clipseg_logits(ctx, seg, params_list) -> list[torch.Tensor]:
    """``scaled_logits`` (what decode thresholds) of every param set and image: labels of a tiny
    model can stay the same under a small change of out_proj, these cannot."""
    out = []
    for p in params_list:
        knobs = full_params(ctx.defaults, p)
        out += [seg.scaled_logits(trial.evidence_for(ctx, item, knobs), knobs)
                for item in ctx.items]
    return out


def same_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def same(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> bool:
    return all(np.array_equal(x, y) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


def assert_params_matter(maps: list[list[np.ndarray]]) -> None:
    """The param sets give different label maps (else equal maps would prove nothing)."""
    distinct = {tuple(m.tobytes() for m in row) for row in maps}
    assert len(distinct) >= 3, "the param sets should not all give the same labels"
    for row in maps:   # and no map is a constant
        assert any(len(np.unique(m)) > 1 for m in row)


def head_path(ctx) -> object:
    return trial.get_cache(ctx).path(ctx.method, trial.decode_state_key(ctx))


# --- clipseg -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clipseg_full(tmp_path_factory):
    """The extraction pass of a clipseg smoke search (in a fresh process's memo), the full
    segmenter it built and its label maps for CLIPSEG_PARAMS."""
    import os

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("clipseg"))
    saved = dict(trial._MEMO)
    trial._MEMO.clear()
    try:
        plan, ctx = smoke_context("clipseg")
        for item in ctx.items:
            assert trial.extract_item(ctx, item)
        full = trial.get_segmenter(ctx)
        maps = label_maps(ctx, full, CLIPSEG_PARAMS)
        yield plan, ctx, full, (maps, clipseg_logits(ctx, full, CLIPSEG_PARAMS))
    finally:
        trial._MEMO.clear()
        trial._MEMO.update(saved)
        os.chdir(old)


def test_clipseg_extraction_builds_the_model_and_caches_its_decode_head(clipseg_full):
    _, ctx, full, (maps, _) = clipseg_full
    assert full.model_built
    assert_params_matter(maps)
    head = EvidenceCache(ctx.cache_dir).get(ctx.method, trial.decode_state_key(ctx))
    assert head is not None
    block = full.visual.transformer.resblocks[-1].attn
    assert torch.equal(head.tensors["out_proj.weight"], block.out_proj.weight.float())
    assert torch.equal(head.tensors["proj"], full.visual.proj.float())
    assert head.meta["heads"] == block.num_heads == 4 and head.meta["num_layers"] == 4  # toy-clip
    assert head.nbytes() < 0.05 * sum(p.numel() * 4 for p in full.model.parameters())


def test_a_clipseg_trial_worker_decodes_from_the_head_without_the_model(clipseg_full,
                                                                        monkeypatch):
    _, ctx, _, (maps, logits) = clipseg_full
    monkeypatch.setattr(trial, "_MEMO", {})      # a fresh trial worker process
    built = count_calls(monkeypatch, clipseg_segmenter, "load_clip")
    seg = trial.get_segmenter(ctx)
    assert not seg.model_built
    assert same(label_maps(ctx, seg, CLIPSEG_PARAMS), maps)
    assert same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits)    # bit for bit
    reports: list[dict] = []
    trial.evaluate(ctx, {"attention": "naclip"}, reports.append)
    assert reports[-1]["images"] == len(ctx.items)
    assert built == [] and not seg.model_built


def test_a_fresh_clipseg_trial_worker_never_imports_open_clip(clipseg_full, tmp_path):
    """A new process (as a Ray trial worker is) decoding cached evidence: open_clip and
    torchvision (~1.5 s and ~240 MB of a worker's import) stay out of it."""
    import pickle
    import subprocess
    import sys

    _, ctx, _, _ = clipseg_full
    (tmp_path / "ctx.pkl").write_bytes(pickle.dumps(ctx))
    code = ("import pickle, sys; from search.core.trial import evaluate; "
            f"ctx = pickle.load(open({str(tmp_path / 'ctx.pkl')!r}, 'rb')); out = []; "
            "evaluate(ctx, {'attention': 'naclip'}, out.append); "
            "print(out[-1]['images'], 'open_clip' in sys.modules, "
            "'torchvision' in sys.modules)")
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(len(ctx.items)), "False", "False"]


def test_clipseg_decode_reads_every_tensor_of_the_head(clipseg_full):
    """A head with one tensor changed decodes differently: the equality above would catch a
    decode that took out_proj (or ln_post, proj) from anywhere but the head it was given."""
    _, ctx, full, (maps, logits) = clipseg_full
    head = full.decode_state()
    gen = torch.Generator().manual_seed(0)
    for name in ("out_proj.weight", "out_proj.bias", "ln_post.weight", "ln_post.bias", "proj"):
        t = head.tensors[name]
        scale = max(float(t.std()), 0.1)         # (the tiny model's biases start at 0)
        other = Evidence({**head.tensors, name: t + scale * torch.randn(t.shape, generator=gen)},
                         dict(head.meta))
        seg = clipseg_segmenter.ClipSegSegmenter.from_decode_state(ctx.backbone, ctx.settings,
                                                                   other)
        assert not same(label_maps(ctx, seg, CLIPSEG_PARAMS), maps), name
        # and the smallest change shows in the logits
        t = head.tensors[name]
        nudged = Evidence({**head.tensors, name: t + 1e-3 * scale}, dict(head.meta))
        seg = clipseg_segmenter.ClipSegSegmenter.from_decode_state(ctx.backbone, ctx.settings,
                                                                   nudged)
        assert not same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits), name


def test_a_clipseg_cache_miss_builds_the_model_to_extract(clipseg_full, monkeypatch, tmp_path):
    plan, ctx, _, (maps, logits) = clipseg_full
    ctx = trial.SearchContext(**{**vars(ctx), "cache_dir": str(tmp_path / "cache")})
    trial.get_cache(ctx).put(ctx.method, trial.decode_state_key(ctx),
                             EvidenceCache(plan.cache_dir).get(ctx.method,
                                                               trial.decode_state_key(ctx)))
    monkeypatch.setattr(trial, "_MEMO", {})      # a worker with the head but no evidence
    built = count_calls(monkeypatch, clipseg_segmenter, "load_clip")
    seg = trial.get_segmenter(ctx)
    assert not seg.model_built
    assert same(label_maps(ctx, seg, CLIPSEG_PARAMS), maps)
    assert same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits)
    assert built == [1] and seg.model_built


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated"])
def test_a_missing_or_damaged_clipseg_head_falls_back_to_the_full_build(clipseg_full, monkeypatch,
                                                                       tmp_path, damage):
    plan, ctx, _, (maps, logits) = clipseg_full
    ctx = trial.SearchContext(**{**vars(ctx), "cache_dir": str(tmp_path / "cache")})
    import shutil

    shutil.copytree(plan.cache_dir, ctx.cache_dir)
    path = head_path(ctx)
    raw = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "flipped":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    else:
        path.write_bytes(raw[: len(raw) // 2])
    monkeypatch.setattr(trial, "_MEMO", {})
    built = count_calls(monkeypatch, clipseg_segmenter, "load_clip")
    seg = trial.get_segmenter(ctx)
    assert built == [1] and seg.model_built
    assert same(label_maps(ctx, seg, CLIPSEG_PARAMS), maps)
    assert same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits)
    assert path.read_bytes() == raw              # the head is written again, intact

    monkeypatch.setattr(trial, "_MEMO", {})      # and the next worker decodes from it
    assert not trial.get_segmenter(ctx).model_built and built == [1]


def test_a_malformed_clipseg_head_falls_back_to_the_full_build(clipseg_full, monkeypatch,
                                                              tmp_path):
    """A head that passes its checksum but lacks a tensor (or names another model) is not used."""
    _, ctx, full, (maps, logits) = clipseg_full
    head = full.decode_state()
    with pytest.raises(OvssError, match="decode head .* malformed"):
        clipseg_segmenter.ClipSegSegmenter.from_decode_state(
            ctx.backbone, ctx.settings,
            Evidence({k: v for k, v in head.tensors.items() if k != "proj"}, dict(head.meta)))
    ctx = trial.SearchContext(**{**vars(ctx), "cache_dir": str(tmp_path / "cache")})
    trial.get_cache(ctx).put(ctx.method, trial.decode_state_key(ctx),
                             Evidence(dict(head.tensors), {**head.meta, "model_name": "other"}))
    monkeypatch.setattr(trial, "_MEMO", {})
    built = count_calls(monkeypatch, clipseg_segmenter, "load_clip")
    seg = trial.get_segmenter(ctx)
    assert built == [1] and seg.model_built
    for item in ctx.items:
        trial.extract_item(ctx, item)
    assert same(label_maps(ctx, seg, CLIPSEG_PARAMS), maps)
    assert same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits)


def test_a_head_from_other_weights_is_refused_when_the_model_is_built(clipseg_full):
    _, ctx, full, _ = clipseg_full
    head = full.decode_state()
    other = Evidence({**head.tensors, "proj": head.tensors["proj"] * 2}, dict(head.meta))
    seg = clipseg_segmenter.ClipSegSegmenter.from_decode_state(ctx.backbone, ctx.settings, other)
    with pytest.raises(OvssError, match="does not match the weights"):
        _ = seg.model


# --- pnp -----------------------------------------------------------------------------------------
def test_a_pnp_trial_worker_never_builds_the_vlm_when_the_evidence_is_cached(workdir,
                                                                           monkeypatch):
    plan, ctx = smoke_context("pnp")
    monkeypatch.setattr(trial, "_MEMO", {})
    for item in ctx.items:                       # the extraction task's work
        assert trial.extract_item(ctx, item)
    full = trial.get_segmenter(ctx)
    assert full.vlm_built                        # extract did need it
    maps = label_maps(ctx, full, PNP_PARAMS)     # (extends the D = 2 chains, cached)
    assert_params_matter(maps)

    monkeypatch.setattr(trial, "_MEMO", {})      # a fresh trial worker process
    built = count_calls(monkeypatch, pnp_segmenter, "load_vlm")
    seg = trial.get_segmenter(ctx)
    assert same(label_maps(ctx, seg, PNP_PARAMS), maps)
    reports: list[dict] = []
    trial.evaluate(ctx, PNP_PARAMS[2], reports.append)
    assert reports[-1]["images"] == len(ctx.items)
    assert built == [] and not seg.vlm_built

    # A cache miss in that worker (evicted entries) does build it, to extract; same labels.
    monkeypatch.setattr(trial, "_MEMO", {})
    for f in plan.cache_dir.rglob("*.safetensors"):
        f.unlink()
    seg = trial.get_segmenter(ctx)
    assert not seg.vlm_built
    assert same(label_maps(ctx, seg, PNP_PARAMS), maps)
    assert built == [1] and seg.vlm_built


def test_pnp_from_spec_checks_without_building_the_vlm(monkeypatch):
    built = count_calls(monkeypatch, pnp_segmenter, "load_vlm")
    tiny = {"name": "tiny", "arch": "blip", "tiny": {"image_size": 64, "patch_size": 16}}
    seg = pnp_segmenter.PnPSegmenter.from_spec(tiny, {"image_size": 64})
    assert not seg.vlm_built and seg.settings_key()["image_size"] == 64
    with pytest.raises(OvssError, match="image_size 72 is not a multiple of the patch size 16"):
        pnp_segmenter.PnPSegmenter.from_spec(tiny, {"image_size": 72})
    with pytest.raises(OvssError, match="unknown setting"):
        pnp_segmenter.PnPSegmenter.from_spec(tiny, {"image_sise": 64})
    with pytest.raises(OvssError, match="tiny backbone: unknown field"):
        pnp_segmenter.PnPSegmenter.from_spec({**tiny, "tiny": {"widht": 8}}, {})
    assert built == []
    assert seg.grid == 4 and built == [1] and seg.vlm_built      # built on first use


def test_a_read_only_cache_still_gives_a_full_segmenter(clipseg_full, monkeypatch, tmp_path):
    """The head is an optimisation: a cache that refuses the write (put's OvssError on a
    permission error) leaves the worker with the full build, decoding the same labels."""
    _, ctx, _, (_, logits) = clipseg_full
    ctx = trial.SearchContext(**{**vars(ctx), "cache_dir": str(tmp_path / "cache")})

    def refuse(self, method, key, evidence):
        raise OvssError(f"cannot write to the evidence cache {self.root}: permission denied")

    monkeypatch.setattr(trial, "_MEMO", {})
    with monkeypatch.context() as m:
        m.setattr(EvidenceCache, "put", refuse)
        seg = trial.get_segmenter(ctx)
    assert seg.model_built and not head_path(ctx).exists()
    for item in ctx.items:
        trial.extract_item(ctx, item)
    assert same_logits(clipseg_logits(ctx, seg, CLIPSEG_PARAMS), logits)


def test_the_driver_decodes_the_overlays_from_the_head_only_when_nothing_else_is_needed(
        clipseg_full, monkeypatch, tmp_path):
    from search.engine.overlays import driver_segmenter, overlay_preds

    _, ctx, full, _ = clipseg_full
    built = count_calls(monkeypatch, clipseg_segmenter, "load_clip")
    seg = driver_segmenter(ctx, 2)
    assert seg is not None and not seg.model_built
    params = full_params(ctx.defaults, CLIPSEG_PARAMS[0])
    mine = overlay_preds(ctx, params, 2, seg)
    assert [m[0] for m in mine] == [item.image_id for item in ctx.items[:2]]
    for (_, img, pred), item in zip(mine, ctx.items):
        ev = trial.evidence_for(ctx, item, params)
        assert np.array_equal(pred, full.decode(ev, params))
        assert img.shape[:2] == pred.shape
    assert built == [] and not seg.model_built
    # An image whose evidence is not cached (the driver would extract): a Ray task decodes.
    cache = EvidenceCache(ctx.cache_dir)
    path = cache.path(ctx.method, ctx.base_key(ctx.items[1]))
    moved = tmp_path / "moved"
    path.rename(moved)
    monkeypatch.setattr(trial, "_MEMO", {})          # no evidence held in memory either
    try:
        assert driver_segmenter(ctx, 2) is None
        assert driver_segmenter(ctx, 1) is not None
    finally:
        moved.rename(path)
    # A method without a decode head: a Ray task decodes.
    _, pnp_ctx = smoke_context("pnp")
    assert driver_segmenter(pnp_ctx, 1) is None


def test_the_driver_overlays_run_on_a_thread_and_write_the_panels(clipseg_full, tmp_path):
    """The driver's overlays decode and encode on a thread while the plots are made: finish()
    returns the PNGs, lossless image | overlay | label colours of the decoded label maps, and
    re-raises a failure of the thread instead of returning nothing."""
    from PIL import Image

    from methods.infer import colorize, overlay
    from search.engine.overlays import driver_segmenter, overlay_preds, start_overlays

    _, ctx, _, _ = clipseg_full
    seg = driver_segmenter(ctx, 2)
    params = full_params(ctx.defaults, CLIPSEG_PARAMS[0])
    finish = start_overlays(ctx, params, tmp_path, seg, n=2)
    paths = finish()
    want = overlay_preds(ctx, params, 2, seg)
    assert [p.name for p in paths] == [f"{i}_overlay.png" for i, _, _ in want]
    for path, (_, img, pred) in zip(paths, want):
        panel = np.concatenate([img, overlay(img, pred), colorize(pred)], 1)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), panel)

    class Broken:
        def decode(self, ev, params):
            raise RuntimeError("decode broke")

    with pytest.raises(RuntimeError, match="decode broke"):
        start_overlays(ctx, params, tmp_path, Broken(), n=2)()
