"""Cost measurement (search/core/cost.py, search/core/trial.py) on a method whose cost is known:
tests/toy_cost_method.py sleeps a set time in extract, in extend per unit of the extraction knob
``pool``, and in decode per unit of the decode knob ``work``. A sleep of s seconds takes at least
s, so each measured part is checked to lie in [s, s + TOL]; TOL is wide because the test machine
is shared (2 cores, often a load of 10 or more), and the medians keep one slow call out."""

from __future__ import annotations

import json

import pytest

from search.core import cost as C

TOL = 0.25          # seconds a loaded machine may add to one timed call
EXTRACT, EXTEND, DECODE = 0.15, 0.05, 0.04


def _ctx(voc_root, **settings):
    from search.engine.plan import plan_search
    from search.engine.search import search_context
    from search.run import build_parser

    sets = [f"settings.{k}={v}" for k, v in settings.items()]
    args = build_parser().parse_args(
        ["--method", "toycost", "--dataset", "voc21", "--data-root", str(voc_root),
         "--max-images", "4", "--rungs", "1", *sum((["--set", s] for s in sets), [])])
    return search_context(plan_search(args), "cpu")


def test_each_part_is_measured_within_its_sleep(workdir, voc_root):
    from search.core.trial import evaluate, extension_cost, extraction_cost, get_segmenter

    ctx = _ctx(voc_root, extract_delay=EXTRACT, extend_delay=EXTEND, decode_step=DECODE)
    got = extraction_cost(ctx)
    assert not got["cached"] and len(got["samples"]) == 3     # conf/cost.yaml: probe.images
    assert EXTRACT <= got["seconds"] < EXTRACT + TOL, got
    assert got["device_kind"].startswith("cpu:")
    again = extraction_cost(ctx)                               # once per setting and device
    assert again["cached"] and again["seconds"] == got["seconds"]

    seg = get_segmenter(ctx)
    for pool in (0, 2):
        ext = extension_cost(ctx, seg, {"temp": 0.1, "pool": pool})
        assert EXTEND * pool <= ext["seconds"] < EXTEND * pool + TOL, (pool, ext)
    assert extension_cost(ctx, seg, {"pool": 2})["cached"]

    ctx.cost_extract = {"seconds": got["seconds"]}
    params = {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 2, "work": 3}
    reports: list = []
    evaluate(ctx, params, reports.append)
    last = reports[-1]
    assert DECODE * 3 <= last["cost/decode_s"] < DECODE * 3 + TOL, last
    assert last["cost/extract_s"] == got["seconds"]
    assert last["cost/extend_s"] == extension_cost(ctx, seg, {"pool": 2})["seconds"]
    assert last["cost/seconds_per_image"] == pytest.approx(
        last["cost/extract_s"] + last["cost/extend_s"] + last["cost/decode_s"])
    # The sum is the whole pipeline's seconds: within the sleeps of all three parts.
    slept = EXTRACT + 2 * EXTEND + 3 * DECODE
    assert slept <= last["cost/seconds_per_image"] < slept + 3 * TOL


def test_a_search_without_cost_reports_none(workdir, voc_root):
    from search.core.trial import evaluate

    ctx = _ctx(voc_root)
    reports: list = []
    evaluate(ctx, {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1, "work": 0},
             reports.append)
    assert not [k for k in reports[-1] if k.startswith("cost/")]


def test_cost_cache_entries_are_checksummed(tmp_path):
    cache = C.CostCache(tmp_path)
    key = C.cost_key("extract", "toy", {"settings": {}}, {}, "cpu:x", ["h1"])
    assert key != C.cost_key("extract", "toy", {"settings": {}}, {}, "cuda:H100", ["h1"])
    assert key != C.cost_key("extend", "toy", {"settings": {}}, {"pool": 1}, "cpu:x", ["h1"])
    calls = []

    def measure():
        calls.append(1)
        return [0.5, 0.1, 0.2]          # median 0.2 (the mean would be 0.27)

    first = C.measured(tmp_path, key, measure, "cpu:x")
    assert first["seconds"] == 0.2 and not first["cached"]
    assert C.measured(tmp_path, key, measure, "cpu:x")["cached"] and len(calls) == 1
    path = cache.path(key)
    doc = json.loads(path.read_text())
    doc["entry"]["seconds"] = 0.001                       # an altered value reads as missing
    path.write_text(json.dumps(doc))
    assert cache.get(key) is None
    again = C.measured(tmp_path, key, measure, "cpu:x")   # measured again, and replaced
    assert len(calls) == 2 and again["seconds"] == 0.2 and cache.get(key)["seconds"] == 0.2
    path.write_text(path.read_text()[:20])                # a half-written file: missing too
    assert cache.get(key) is None
    assert not list(path.parent.glob(".*tmp*"))           # atomic writes leave no temp file


def test_time_calls_warms_up_untimed():
    import time

    seen = []

    def slow_first():
        seen.append(1)
        time.sleep(0.3 if len(seen) == 1 else 0.0)

    out = C.time_calls([slow_first, slow_first], "cpu", warmup=1)
    assert len(seen) == 3 and max(out) < 0.2


def test_pamr_steps_are_in_the_decode_cost(workdir, monkeypatch):
    """PAMR (main's methods/pamr.py) runs inside clipseg's decode, so a config with PAMR on pays
    its seconds in ``cost/decode_s`` and in the sum: PAMR is wrapped to sleep a known time on top
    of its real work, and the timed decode must contain that sleep once per image."""
    import time

    import methods.clipseg.decoding as S  # decode calls PAMR from here
    from search.core.trial import evaluate, extract_item
    from search.engine.plan import plan_search
    from search.engine.search import search_context
    from search.run import build_parser

    pamr_s, real, steps = 0.3, S.pamr, []

    def slow_pamr(guide, x, n, dilations):
        steps.append(n)
        time.sleep(pamr_s)
        return real(guide, x, n, dilations)

    monkeypatch.setattr(S, "pamr", slow_pamr)
    args = build_parser().parse_args(["--method", "clipseg", "--preset", "smoke",
                                      "--max-images", "2", "--rungs", "1"])
    plan = plan_search(args)
    ctx = search_context(plan, "cpu")
    for item in ctx.items:
        extract_item(ctx, item)
    ctx.cost_extract = {"seconds": 0.0}
    last = {}
    for n in (0, 10):
        reports: list = []
        evaluate(ctx, {**plan.resolved.defaults, "pamr_steps": n}, reports.append)
        last[n] = reports[-1]
    assert steps == [10] * 2                       # PAMR ran only with steps > 0, per image
    # The sleep bounds the decode with PAMR from below; without PAMR, decode sleeps nothing
    # (its own seconds vary with the machine's load, so it is compared with the PAMR one).
    assert pamr_s <= last[10]["cost/decode_s"] and last[0]["cost/decode_s"] < last[10][
        "cost/decode_s"], last
    assert last[10]["cost/seconds_per_image"] >= pamr_s + last[10]["cost/extend_s"]
