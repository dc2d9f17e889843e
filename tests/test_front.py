"""The logic of a cost-aware search without Ray (search/core/front.py, search/core/space.py:
fit_to_space): the Pareto front, the budget, the picks, patience and the objectives flag, each
checked against the test's own direct transcription of its definition (docs/cost.md)."""

from __future__ import annotations

import random

import pytest

from methods.base import OvssError
from search.core import front as F


def _dominated_by(a, b) -> bool:
    """Direct: b is no worse than a in both (score up, seconds down) and better in one."""
    return (b["score"] >= a["score"] and b["seconds"] <= a["seconds"]
            and (b["score"] > a["score"] or b["seconds"] < a["seconds"]))


def _direct_front(points) -> set[int]:
    """O(n^2): the points no other point dominates."""
    return {i for i, a in enumerate(points)
            if not any(_dominated_by(a, b) for j, b in enumerate(points) if j != i)}


@pytest.mark.parametrize("seed", range(40))
def test_front_is_the_set_no_point_dominates(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    # Coarse grids make ties in score, in seconds and whole twins common.
    points = [{"score": rng.randint(0, 6) / 6, "seconds": rng.randint(1, 5) / 10}
              for _ in range(n)]
    got = F.pareto_front(points)
    assert len(got) == len(set(got))
    assert set(got) == _direct_front(points)
    # fastest first
    assert [points[i]["seconds"] for i in got] == sorted(points[i]["seconds"] for i in got)


def test_front_examples():
    pts = [{"score": 0.5, "seconds": 1.0}, {"score": 0.5, "seconds": 1.0},   # twins: both kept
           {"score": 0.5, "seconds": 2.0},                                     # same score, slower
           {"score": 0.7, "seconds": 2.0}, {"score": 0.6, "seconds": 3.0}]
    assert F.pareto_front(pts) == [0, 1, 3]
    assert F.dominates(pts[0], pts[2]) and not F.dominates(pts[0], pts[1])


def test_best_and_fastest_within_under_a_budget():
    pts = [{"score": 0.80, "seconds": 0.9}, {"score": 0.79, "seconds": 0.2},
           {"score": 0.75, "seconds": 0.1}, {"score": 0.80, "seconds": 0.5}]
    assert F.best_point(pts) is pts[3]                    # tie on score: the faster one
    assert F.best_point(pts, budget=0.4) is pts[1]
    assert F.best_point(pts, budget=0.05) is None
    assert F.fastest_within(pts, 0.01) is pts[1]          # 0.79 >= 0.80 - 0.01
    assert F.fastest_within(pts, 0.001) is pts[3]
    assert F.fastest_within(pts, 0.01, budget=0.15) is pts[2]
    assert F.feasible({"seconds": None}, 1.0) is False and F.feasible({"seconds": None}, None)
    # Two equally fast points within the margin: the higher score (the other is dominated).
    tie = [{"score": 0.80, "seconds": 0.5}, {"score": 0.78, "seconds": 0.2},
           {"score": 0.79, "seconds": 0.2}]
    assert F.fastest_within(tie, 0.05) is tie[2] and F.fastest_within(tie[::-1], 0.05) is tie[2]


def test_pick_rules():
    pts = [{"score": 0.8, "seconds": 0.5, "params": {"a": 1}},
           {"score": 0.7, "seconds": 0.1, "params": {"a": 2}}]
    assert F.pick(pts, *F.parse_pick("best")) is pts[0]
    assert F.pick(pts, *F.parse_pick("fastest-within=0.2")) is pts[1]
    assert F.pick(pts, *F.parse_pick("fastest-within=0.05")) is pts[0]
    assert F.pick(pts, *F.parse_pick("budget=0.3")) is pts[1]
    with pytest.raises(OvssError, match=r"budget=0.05.*fastest takes 0.1 s .*'a': 2"):
        F.pick(pts, *F.parse_pick("budget=0.05"))
    for bad in ("fastest", "budget=-1", "budget=abc", "fastest-within=nan", "worst=1"):
        with pytest.raises(OvssError, match="--pick"):
            F.parse_pick(bad)


def test_searcher_sets_the_budget_constraint_and_stops_on_patience():
    """PrunedAwareOptunaSearch (no Ray needed): a trial's seconds over the budget become its
    Optuna constraint (> 0: infeasible), full and pruned trials feed patience, and once patience
    runs out the searcher answers FINISHED."""
    import optuna

    from search.core.front import BUDGET_CONSTRAINT, COST_METRIC
    from search.engine.tuning import PrunedAwareOptunaSearch

    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    s = PrunedAwareOptunaSearch(space=space, metric=["score", COST_METRIC], mode=["max", "min"],
                                sampler=optuna.samplers.RandomSampler(seed=0), full_images=4,
                                patience=F.Patience(2, 0.0, budget=0.5, use_seconds=True),
                                budget=0.5)
    results = [{"score": 0.5, "images": 4, COST_METRIC: 0.7},    # over budget: no improvement
               {"score": 0.4, "images": 4, COST_METRIC: 0.2},    # the first feasible: improves
               {"score": 0.9, "images": 2, COST_METRIC: 0.1},    # pruned: no improvement
               {"score": 0.3, "images": 4, COST_METRIC: 0.3}]    # dominated: no improvement
    for i, r in enumerate(results):
        assert isinstance(s.suggest(f"t{i}"), dict)
        s.on_trial_complete(f"t{i}", r)
    trials = s._ot_study.trials
    assert [t.constraints for t in trials] == [
        {BUDGET_CONSTRAINT: pytest.approx(0.2)}, {BUDGET_CONSTRAINT: pytest.approx(-0.3)},
        {BUDGET_CONSTRAINT: pytest.approx(-0.4)}, {BUDGET_CONSTRAINT: pytest.approx(-0.2)}]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert s.patience.exhausted and s.patience.seen == 4
    assert s.suggest("t4") == PrunedAwareOptunaSearch.FINISHED


def test_patience_one_objective():
    p = F.Patience(3, margin=0.01)
    seq = [(0.5, None), (0.505, None), (0.51, None), (0.52, None), (0.52, None), (None, None),
           (0.529, None)]
    improved = [p.observe(s, t) for s, t in seq]
    # 0.5 first; 0.505 and 0.51 are within 0.01 of 0.5 (not beyond it); 0.52 beats 0.5 by 0.02
    assert improved == [True, False, False, True, False, False, False]
    assert p.exhausted and p.seen == 7 and "3 trials in a row" in p.reason()


def test_patience_never_stops_an_improving_search():
    p = F.Patience(2, margin=0.001)
    for i in range(20):
        assert p.observe(0.1 + 0.01 * i, None)
    assert not p.exhausted


def test_patience_two_objectives_and_budget():
    p = F.Patience(2, margin=0.01, budget=1.0, use_seconds=True)
    assert p.observe(0.8, 0.9)
    assert p.observe(0.795, 0.3)       # within the margin, but faster: a new front point
    assert not p.observe(0.79, 0.5)    # 0.795 at 0.3 s is within the margin and faster
    assert not p.observe(0.99, 1.5)    # over budget
    assert p.exhausted
    q = F.Patience(1, margin=0.01, use_seconds=False)
    assert q.observe(0.8, 0.9) and not q.observe(0.795, 0.3)   # one objective: seconds ignored


@pytest.mark.parametrize("text, reward, want", [
    (None, None, ("miou", ("miou",))), (None, "clip", ("clip", ("clip",))),
    ("miou,seconds", None, ("miou", ("miou", "seconds"))),
    ("seconds,clip", None, ("clip", ("clip", "seconds"))),
    ("clip,seconds", "clip", ("clip", ("clip", "seconds"))), ("miou", None, ("miou", ("miou",)))])
def test_objectives(text, reward, want):
    assert F.parse_objectives(text, reward) == want


@pytest.mark.parametrize("text, reward, match", [
    ("miou,latency", None, "'latency'"), ("seconds", None, "exactly one reward"),
    ("miou,clip", None, "exactly one reward"), ("miou,miou", None, "twice"),
    ("clip,seconds", "miou", "--reward is miou")])
def test_bad_objectives(text, reward, match):
    with pytest.raises(OvssError, match=match):
        F.parse_objectives(text, reward)


def test_fit_to_space_drops_clips_and_fills():
    from methods.spec import CategoricalParam, FloatParam, IntParam
    from search.core.space import fit_to_space

    space = {"temp": FloatParam(type="float", low=0.01, high=1.0, log=True),
             "thr": FloatParam(type="float", low=0.05, high=0.95, step=0.05),
             "pool": IntParam(type="int", low=0, high=2),
             "mode": CategoricalParam(type="categorical", choices=["linear", "square"]),
             "flag": CategoricalParam(type="categorical", choices=[True, False])}
    fill = {"temp": 0.1, "thr": 0.3, "pool": 1, "mode": "linear", "flag": True}
    point, notes = fit_to_space({"temp": "1.5", "thr": "0.33", "pool": "1", "mode": "cubic",
                                 "layer": "7", "flag": "False"}, space, fill)
    assert point == {"temp": 1.0, "thr": 0.35, "pool": 1, "mode": "linear", "flag": False}
    assert isinstance(point["pool"], int) and point["flag"] is False
    assert "dropped layer (not searched here)" in notes
    assert any(n.startswith("dropped mode=cubic") for n in notes)
    assert any(n.startswith("clipped temp 1.5 -> 1.0") for n in notes)
    assert any(n.startswith("clipped thr 0.33 -> 0.35") for n in notes)
    assert not any("pool" in n for n in notes)
    point, notes = fit_to_space({"temp": 0.2}, space, fill)      # typed values; missing knobs
    assert point["temp"] == 0.2 and point["pool"] == 1
    assert "filled pool=1 (the config has no pool)" in notes


def test_front_csv_round_trip():
    from methods.spec import CategoricalParam, FloatParam, IntParam

    space = {"temp": FloatParam(type="float", low=0.01, high=1.0, log=True),
             "pool": IntParam(type="int", low=0, high=2),
             "mode": CategoricalParam(type="categorical", choices=["linear", 3])}
    table = [{"trial": 4, "miou": 0.123456789012345, "seconds_per_image": 0.0123456789,
              "temp": 0.06824078427098834, "pool": 2, "mode": 3, "run_id": "r4"}]
    back = F.read_front(F.front_csv(table), space, "miou")
    assert back == [{"score": 0.123456789012345, "seconds": 0.0123456789,
                     "params": {"temp": 0.06824078427098834, "pool": 2, "mode": 3},
                     "run_id": "r4", "trial": "4"}]


def test_the_best_config_is_the_best_within_the_budget():
    """search.engine.outputs.best_config (what best_config.yaml, the model and search.export
    get) on Tune-like results: the best score within the budget, not the best score."""
    from types import SimpleNamespace

    from methods.spec import FloatParam
    from search.core.front import COST_METRIC
    from search.engine.outputs import best_config

    def result(i, score, seconds, images=4):
        return SimpleNamespace(error=None, config={"temp": 0.1 * (i + 1)},
                               metrics={"score": score, "images": images, COST_METRIC: seconds,
                                        "trial_id": f"t{i}"})

    results = [result(0, 0.9, 0.8), result(1, 0.7, 0.3), result(2, 0.8, 0.35),
               result(3, 0.95, 0.1, images=2)]          # pruned: never the best
    plan = SimpleNamespace(
        resolved=SimpleNamespace(method="toy", backbone_name="tiny", backbone={"name": "tiny"},
                                 settings={}, defaults={"temp": 0.1},
                                 space={"temp": FloatParam(type="float", low=0.01, high=1.0)}),
        dataset_name="voc21", classes=SimpleNamespace(to_dict=lambda: {}),
        reward={"name": "miou"}, tracking_uri="sqlite:///x.db",
        cost=SimpleNamespace(budget=0.4, device_kind="cpu:test"))
    callback = SimpleNamespace(runs={f"t{i}": f"run{i}" for i in range(4)})
    config, best, rows = best_config(plan, results, "parent", callback)
    assert best["trial_id"] == "t2" and config["params"]["temp"] == pytest.approx(0.3)
    assert config["cost"] == {"seconds_per_image": 0.35, "device_kind": "cpu:test",
                              "budget": 0.4}
    assert config["provenance"]["trial_run_id"] == "run2" and len(rows) == 4
    plan.cost.budget = None
    assert best_config(plan, results, "parent", callback)[1]["trial_id"] == "t0"
