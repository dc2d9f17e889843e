"""The searcher and scheduler a search builds: early-stopped trials reach Optuna as PRUNED, ASHA's
milestones are the image counts of the rungs, and parallel TPE suggestions spread out."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from search.engine.tuning import ImageRungScheduler, PrunedAwareOptunaSearch, tune_interrupted

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0),
         "k": optuna.distributions.IntDistribution(1, 12)}


def _searcher(startup=2, full=8):
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=startup, constant_liar=True)
    return PrunedAwareOptunaSearch(space=SPACE, sampler=sampler, metric="score", mode="max",
                                   full_images=full)


def test_early_stopped_trials_are_pruned_in_optuna():
    s = _searcher()
    for i in range(3):
        s.suggest(f"t{i}")
        s.on_trial_result(f"t{i}", {"score": 0.1 * i, "images": 2, "training_iteration": 1})
    s.on_trial_complete("t0", {"score": 0.9, "images": 2})     # stopped at rung 0
    s.on_trial_complete("t1", {"score": 0.5, "images": 8})     # scored on every image
    s.on_trial_complete("t2", None, error=True)
    states = [t.state for t in s._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.FAIL]
    assert s._ot_study.best_value == 0.5          # the 2-image 0.9 is not comparable
    assert s._ot_study.trials[0].intermediate_values == {1: 0.0}


def test_parallel_suggestions_spread_out_after_startup():
    s = _searcher(startup=2)
    for i in range(6):                            # history past the random start-up
        cfg = s.suggest(f"h{i}")
        s.on_trial_complete(f"h{i}", {"score": -abs(cfg["x"] - 0.3), "images": 8})
    pending = [s.suggest(f"p{i}") for i in range(4)]   # 4 trials at once, none finished
    assert len({(round(c["x"], 6), c["k"]) for c in pending}) == 4
    assert s._ot_study.sampler._constant_liar


def _feed(sched, trial, images, score):
    return sched.on_trial_result(None, trial, {"images": images, "score": score})


@pytest.mark.parametrize("rungs", [[2, 3, 5, 10], [1, 2, 4, 8, 16], [3, 5, 10]])
def test_asha_milestones_are_the_image_counts(rungs):
    sched = ImageRungScheduler(rungs, reduction_factor=2, metric="score", mode="max")
    assert sorted(m for m, _ in sched._brackets[0]._rungs) == rungs[:-1]
    # At every milestone, a trial below the top half of those recorded there is stopped.
    for milestone in rungs[:-1]:
        good = SimpleNamespace(trial_id=f"g{milestone}")
        bad = SimpleNamespace(trial_id=f"b{milestone}")
        for t in (good, bad):
            sched.on_trial_add(None, t)
        for m in rungs[:rungs.index(milestone)]:      # both pass the earlier milestones
            _feed(sched, good, m, 1.0)
            _feed(sched, bad, m, 1.0)
        assert _feed(sched, good, milestone, 0.9) == TrialScheduler.CONTINUE
        assert _feed(sched, bad, milestone, 0.1) == TrialScheduler.STOP


def test_interrupt_is_read_from_tunes_sigint_handler():
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    event = threading.Event()

    def signal_interrupt_tune_run(sig, frame):   # the shape of Tune's own handler
        event.set()
        signal.signal(signal.SIGINT, before)

    signal.signal(signal.SIGINT, signal_interrupt_tune_run)
    assert tune_interrupted(before) is False       # still installed: not interrupted
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, signal_interrupt_tune_run)
    signal_interrupt_tune_run(signal.SIGINT, None)  # fired: Tune put ``before`` back
    assert tune_interrupted(before) is True


def test_a_nan_score_fails_the_trial(voc_root, tmp_path, monkeypatch):
    import search.core.trial as trial
    from search.core.cache import file_hash
    from search.data import open_dataset

    data = open_dataset("voc21", str(voc_root))
    items = [trial.ImageItem(i, str(data.ids()[i]), file_hash(data.image_path(i)), ())
             for i in range(2)]
    ctx = trial.SearchContext(
        method="toy", backbone={"name": "tiny"}, settings={"seed": 0}, defaults={
            "temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1},
        classes=data.classes.to_dict(), dataset={"name": "voc21", "root": str(voc_root)},
        items=items, rungs=[1, 2], reward={"name": "miou"}, cache_dir=str(tmp_path),
        extraction_knobs=("pool",))
    reports = []
    assert trial.evaluate(ctx, {}, reports.append)["images"] == 2   # finite: two reports
    assert len(reports) == 2

    class NanScore:
        def update(self, *a, **k):
            pass

        def value(self):
            return float("nan")

        def details(self):
            return {}

    monkeypatch.setattr(trial, "make_scorer", lambda ctx, name=None: NanScore)
    with pytest.raises(trial.TrialScoreError, match="nan after 1 images"):
        trial.evaluate(ctx, {}, reports.append)


def test_the_random_sampler_gives_the_same_trials_at_any_concurrency():
    from search.engine.tuning import make_sampler

    def run(concurrent: int) -> list[tuple]:
        s = PrunedAwareOptunaSearch(space=SPACE, sampler=make_sampler("random", 3, 8),
                                    metric="score", mode="max", full_images=8)
        out, running = [], []
        for i in range(8):
            cfg = s.suggest(f"t{i}")
            out.append((round(cfg["x"], 9), cfg["k"]))
            running.append(f"t{i}")
            if len(running) == concurrent:      # the last started finishes first
                for tid in reversed(running):
                    s.on_trial_complete(tid, {"score": float(len(out)), "images": 8})
                running = []
        return out

    assert run(1) == run(2) == run(4)
    assert len(set(run(1))) == 8
    # TPE's suggestions after its start-up depend on the results it has seen.
    tpe = make_sampler("tpe", 3, 8)
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._constant_liar


class _Fit(Exception):
    pass


def test_the_pending_trial_limit_is_set_for_each_search_alone(tmp_path, monkeypatch):
    """Tune reads TUNE_MAX_PENDING_TRIALS_PG when fit() starts; a search set it for the rest of
    the process, so a later search in it (another --backbone, a notebook) kept the first one's
    limit: one pending trial, and its trials started one at a time."""
    import os

    import ray
    from ray import tune

    from search.engine.tuning import tune_search

    seen = []

    def fit(self):
        seen.append(os.environ.get("TUNE_MAX_PENDING_TRIALS_PG"))
        raise _Fit

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(tune.Tuner, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(tune.Tuner, "fit", fit)
    monkeypatch.setattr("search.core.space.optuna_space", lambda s: {})
    monkeypatch.setattr("search.core.space.trial0", lambda d, s: {})
    monkeypatch.setattr("ray.tune.search.optuna.OptunaSearch.__init__",
                        lambda self, *a, **k: None)

    def search(max_concurrent):
        plan = SimpleNamespace(
            resolved=SimpleNamespace(space={"temp": SimpleNamespace()}, defaults={"temp": 0.1}),
            storage=tmp_path / "ray_results", name="s", num_samples=4, rungs=[1],
            reward={"name": "miou"},     # the progress line names the score (#19)
            args=SimpleNamespace(cpus_per_trial=1.0, gpus_per_trial=0.0, resume=False, seed=0,
                                 max_concurrent=max_concurrent, sampler="tpe"))
        with pytest.raises(_Fit):
            tune_search(plan, SimpleNamespace(), callback=None)

    search(1)
    search(3)
    search(None)        # as many as the cluster's CPUs hold
    assert seen == ["1", "3", "4"]
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "7")   # the user's own setting wins
    search(2)
    assert seen[-1] == "7" and os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "7"
