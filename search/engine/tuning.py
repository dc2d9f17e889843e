"""Phase 5 of a search (docs/architecture.md), tuning: a Ray Tune ``Tuner`` with Optuna's sampler
(the paper defaults enqueued as trial 0) and ASHA over growing image subsets; each trial decodes
cached evidence and scores it (:func:`search.core.trial.evaluate`)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from methods.base import OvssError
from search.core.errors import user_error

TRIAL_RETRIES = 2     # Tune re-runs a failed trial this many times (FailureConfig.max_failures)


def _trainable(config: dict, ctx=None) -> None:
    from ray import tune

    from search.core.trial import evaluate
    from search.engine.extract import where_am_i

    where = where_am_i(ctx)
    evaluate(ctx, config, lambda result: tune.report({**result, **where}))


class PrunedAwareOptunaSearch(OptunaSearch):
    """Ray's Optuna searcher, but a trial stopped early by the scheduler (fewer images than the
    full tuning set) is told to Optuna as PRUNED, not COMPLETE with its few-image score: TPE
    must not compare a 2-image mIoU with a 16-image one. Its per-rung values stay reported as
    intermediate values (``on_trial_result``), which TPE uses to rank pruned trials.

    A cost-aware search (docs/cost.md): with a ``budget``, each trial's seconds per image over
    it is set on its Optuna trial as a constraint (``Trial.set_constraint``; > 0: infeasible)
    before it is told, which TPE and NSGA-II read; with ``patience``
    (:class:`search.core.front.Patience`) the searcher answers ``FINISHED`` once that many
    trials in a row brought no improvement, and Tune lets the running trials end."""

    def __init__(self, *args, full_images: int, patience=None, budget: float | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.full_images = int(full_images)
        self.patience = patience
        self.budget = budget

    def suggest(self, trial_id):
        if self.patience is not None and self.patience.exhausted:
            return OptunaSearch.FINISHED
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id, result=None, error=False):
        from search.core.front import BUDGET_CONSTRAINT, COST_METRIC, budget_constraint

        full = bool(result) and not error and int(result.get("images", 0)) >= self.full_images
        seconds = (result or {}).get(COST_METRIC)
        if self.budget is not None and seconds is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_constraint(
                BUDGET_CONSTRAINT, budget_constraint(seconds, self.budget))
        if self.patience is not None and trial_id not in self._completed_trials:
            self.patience.observe(float(result["score"]) if full else None, seconds)
        if result and not error and not full:
            result = None   # OptunaSearch tells a result-less, error-less trial as PRUNED
        super().on_trial_complete(trial_id, result, error)


class ImageRungScheduler(ASHAScheduler):
    """ASHA whose milestones are the search's image counts (``time_attr="images"``).

    Ray's ASHA puts milestones at ``grace * rf**k`` of its time attribute; with rungs of
    2, 4, 8, 16 images and ``training_iteration`` as the clock that is 1, 2, 4, 8 iterations, which
    skips rung 3 when there are 4 or more. Here every rung but the last is a milestone, whatever
    ``--rungs``: a trial is stopped at rung r when its score is below the top 1/rf of the scores
    recorded at rung r so far (ASHA's rule)."""

    def __init__(self, rungs: list[int], reduction_factor: float = 2, **kwargs):
        super().__init__(time_attr="images", max_t=int(rungs[-1]), grace_period=int(rungs[0]),
                         reduction_factor=reduction_factor, brackets=1, **kwargs)
        milestones = [int(r) for r in rungs[:-1]]
        for bracket in self._brackets:
            bracket._rungs = [(m, {}) for m in reversed(milestones)]


def tune_interrupted(before) -> bool:
    """Whether Tune's Ctrl-C handler fired during ``fit``; ``before`` is the SIGINT handler
    installed before ``fit``, put back here.

    Tune (main thread, ``TUNE_DISABLE_SIGINT_HANDLER`` unset) installs its own SIGINT handler
    for ``fit`` and, when it fires, puts ``before`` back and stops gracefully; otherwise its
    handler stays installed. Counting runs is no test: a resumed search need not create any."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGINT)
    installs = (threading.current_thread() is threading.main_thread()
                and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))
    fired = installs and handler is before
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, before)   # Ctrl-C after tuning raises KeyboardInterrupt
    return fired


def _callbacks(plan, callback) -> list:
    """The MLflow record, the progress line and Tune's JSON logger (``result.json`` and
    ``params.json`` per trial, what ``search.sync`` reads). Tune's other default loggers (CSV and
    TensorBoard: a writer thread and two more files per trial) are off: nothing reads them."""
    from ray.tune.logger import JsonLoggerCallback

    from search.record.progress import ProgressLine

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [callback, ProgressLine(plan.num_samples, metric=plan.reward["name"]),
            JsonLoggerCallback()]


def make_sampler(name: str, seed: int, num_samples: int):
    """The Optuna sampler of ``--sampler``. ``tpe``: start-up of a quarter of the trials (2..10),
    ``constant_liar`` so that trials running at once see each other as bad results and parallel
    suggestions spread out instead of piling onto one point (one or two objectives: Optuna's
    TPE is MOTPE with two). ``random``: the i-th suggestion depends on the seed and i only, so a
    search gives the same trials at any concurrency. ``nsga2``: NSGA-II, generations of a
    quarter of the trials (4 or more). TPE and NSGA-II avoid trials over a budget (their
    constraint, :class:`PrunedAwareOptunaSearch`); random ignores it."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, num_samples // 4),
                                             seed=seed)
    startup = max(2, min(10, num_samples // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _new_tuner(plan, ctx, callback, trainable):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from search.core.front import COST_METRIC, Patience
    from search.core.space import optuna_space, trial0

    r, args = plan.resolved, plan.args
    cost = getattr(plan, "cost", None)
    budget = cost.budget if cost is not None else None
    sampler = make_sampler(getattr(args, "sampler", "tpe"), args.seed, plan.num_samples)
    two = cost is not None and cost.seconds
    warm = cost.warm.points if cost is not None and cost.warm is not None else []
    patience = (Patience(cost.patience, cost.margin, budget, two)
                if cost is not None and cost.patience else None)
    if cost is not None:
        cost.tracker = patience      # read by search.engine.pareto.stop_reason after fit
    searcher = PrunedAwareOptunaSearch(
        space=optuna_space(r.space), sampler=sampler,
        metric=["score", COST_METRIC] if two else "score", mode=["max", "min"] if two else "max",
        points_to_evaluate=[trial0(r.defaults, r.space), *warm], full_images=plan.rungs[-1],
        patience=patience, budget=budget)
    # Two objectives: no ASHA (docs/cost.md). Its rungs compare quality only, so they would stop
    # the cheap configs first, the front's fast end; and Optuna takes no intermediate values
    # of a multi-objective trial. Every trial is scored on every image.
    scheduler = (ImageRungScheduler(plan.rungs, reduction_factor=2, metric="score", mode="max")
                 if len(plan.rungs) > 1 and not two else FIFOScheduler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=plan.num_samples, reuse_actors=True,
                                    max_concurrent_trials=args.max_concurrent or None),
        run_config=tune.RunConfig(name=plan.name, storage_path=str(plan.storage),
                                  callbacks=_callbacks(plan, callback), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)))


def tune_search(plan, ctx, callback):
    import shutil
    import signal

    import ray
    from ray import tune


    r, args = plan.resolved, plan.args
    if not r.space:
        raise OvssError("nothing to search: every knob of the space is fixed by --set")
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    path = plan.storage / plan.name
    # Tune unpickles what it finds here on --resume: only this user may write (or read) it.
    from methods.io import private_dir

    private_dir(plan.storage)
    # Tune keeps a single pending trial for a searcher by default, which on short trials leaves
    # all but one worker idle; allow as many pending trials as can run at once.
    # Tune reads it when fit() builds its controller; set for this search only (a second search
    # in the same process, such as --backbone a,b, gets its own), unless the user set it.
    slots = int(ray.cluster_resources().get("CPU", 1) // max(args.cpus_per_trial, 1e-6))
    from search.core.console import tune_env
    from search.engine.session import scoped_env

    pending_limit = scoped_env({"TUNE_MAX_PENDING_TRIALS_PG":
                                str(max(1, min(slots, args.max_concurrent or slots))),
                                **tune_env(getattr(args, "verbose", False))})
    if args.resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        # The pickled run config holds the old callback object; log through this run's one.
        # Which trial owns which child run comes from MLflow (callback.reconcile), not from the
        # checkpoint, which can be ~10 s older than the record.
        tuner._local_tuner.get_run_config().callbacks = _callbacks(plan, callback)
    else:
        # A fresh search, or a resumed one whose driver died before Tune saved any state (during
        # extraction, or in the first seconds of tuning): start tuning anew in the same parent
        # run; child runs of the dead driver are closed as orphans by callback.reconcile.
        if args.resume and path.exists():
            shutil.rmtree(path)
        tuner = _new_tuner(plan, ctx, callback, trainable)
    before = signal.getsignal(signal.SIGINT)
    # Tune's banners go to stderr: stdout keeps the summary
    with pending_limit, contextlib.redirect_stdout(sys.stderr):
        results = tuner.fit()
    interrupted = tune_interrupted(before)
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", []) or [])
    callback.reconcile(trials)   # a resumed search whose trials had all ended runs no step
    # Tune turns Ctrl-C into a graceful stop and returns; tell it apart from a finished search
    # so the runs end KILLED (not FINISHED) and the user is told to --resume.
    if interrupted or any(str(t.status) not in ("TERMINATED", "ERROR") for t in trials):
        raise KeyboardInterrupt
    ok = [res for res in results if res.error is None and res.metrics]
    if not ok:
        errors = [res.error for res in results if res.error is not None]
        user = next((u for u in map(user_error, errors) if u is not None), None)
        if user is not None:
            raise OvssError(str(user))
        first = str(errors[0]).strip().splitlines()[-1] if errors else "no trial reported"
        raise OvssError(f"every trial failed: {first}")
    return results


def best_result(results, searched: list[str], budget: float | None = None
                ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Best trial among those scored on the most images (ASHA-pruned trials saw fewer) and,
    with a ``budget``, within it (None when none is: :func:`search.engine.pareto.check_budget`
    says so first); ties go to the faster trial. Also every scored trial's row (``seconds``:
    its seconds per image, None when the search measured no cost)."""
    from search.core.front import COST_METRIC, best_point

    rows = []
    for res in results:
        if res.error is not None or not res.metrics or "score" not in res.metrics:
            continue
        cost = res.metrics.get(COST_METRIC)
        rows.append({"score": float(res.metrics["score"]),
                     "images": int(res.metrics.get("images", 0)),
                     "seconds": float(cost) if cost is not None else None,
                     "params": {k: res.config[k] for k in searched if k in res.config},
                     "metrics": dict(res.metrics), "trial_id": res.metrics.get("trial_id")})
    top = max(r["images"] for r in rows)
    full = [r for r in rows if r["images"] == top]
    return best_point(full, budget), rows
