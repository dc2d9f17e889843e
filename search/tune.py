"""The Ray parts of a search: the extraction pass (Ray tasks) and tuning (Ray Tune + Optuna +
ASHA), and what the parent MLflow run gets at the end (best config, plots, overlays)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from methods.base import OvssError


def _user_error(e: BaseException) -> OvssError | None:
    """The OvssError inside a Ray task / trial error, if there is one."""
    seen = 0
    while isinstance(e, BaseException) and seen < 10:
        # RayTaskError.cause is the task's exception; RayActorError's may be a protobuf
        # context or text (OOM kills, dead workers): follow exceptions only.
        try:
            cause = getattr(e, "cause", None)
        except Exception:  # a Ray dual exception's __getattr__ without its cause: recursion
            cause = None
        # RayTaskError(OvssError) is an OvssError too, but its text is the remote traceback.
        if isinstance(e, OvssError) and not isinstance(cause, OvssError):
            return e
        e = cause if isinstance(cause, BaseException) else e.__cause__
        seen += 1
    return None


EXTRACT_RETRIES = 3   # Ray re-runs an extraction task whose worker died this many times
TRIAL_RETRIES = 2     # Tune re-runs a failed trial this many times (FailureConfig.max_failures)


def _extract_task(ctx, item) -> tuple[bool, dict[str, str]]:
    from search.trial import extract_item

    return extract_item(ctx, item), where_am_i(ctx)


def extraction_pass(ctx, gpus: float, cpus: float) -> int:
    """Fill the evidence cache for every tuning image not already in it; returns how many."""
    import ray
    from tqdm import tqdm

    from search.cache import EvidenceCache

    cache = EvidenceCache(ctx.cache_dir)
    todo = [it for it in ctx.items if not cache.has(ctx.method, ctx.base_key(it))]
    cached = len(ctx.items) - len(todo)
    print(f"evidence cache {ctx.cache_dir}: {cached}/{len(ctx.items)} images cached",
          file=sys.stderr)
    if not todo:
        return 0
    # A worker that dies (SIGKILL, node lost, OOM kill) is retried by Ray; an exception the
    # task raises (a corrupt image, a missing checkpoint) is not: it is the user's to fix.
    task = ray.remote(_extract_task).options(num_cpus=cpus, num_gpus=gpus,
                                             max_retries=EXTRACT_RETRIES,
                                             retry_exceptions=False)
    import copy

    # Extraction runs the model on the extraction tasks' own device, not the trials'.
    ectx = copy.copy(ctx)
    ectx.device = "cuda" if gpus > 0 else "cpu"
    ctx_ref = ray.put(ectx)
    pending = [task.remote(ctx_ref, it) for it in todo]
    nodes: set[str] = set()
    with tqdm(total=len(pending), desc="extract", unit="img", file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                for _computed, where in ray.get(done):
                    if where.get("device_note") and where["node_id"] not in ctx.device_notes:
                        ctx.device_notes[where["node_id"]] = where["device_note"]
                        bar.write(f"warning: extraction on {where['device_note']}",
                                  file=sys.stderr)
                    nodes.add(where["node_id"])
            except Exception as e:
                for ref in pending:
                    ray.cancel(ref)
                # Let the cancelled tasks end (their cache writes clean up) before Ray stops.
                if pending:
                    ray.wait(pending, num_returns=len(pending), timeout=30)
                user = _user_error(e)
                if user is not None:
                    raise OvssError(str(user)) from None
                raise
            bar.update(len(done))
    ctx.extract_nodes = sorted(nodes)
    return len(todo)


def where_am_i(ctx) -> dict[str, str]:
    """The Ray node (id and IP) and torch device this worker runs on: tagged on each child
    run, so a cluster search shows where its trials ran."""
    import ray

    from search.devices import worker_device

    rc = ray.get_runtime_context()
    dev = worker_device(ctx.device)
    where = {"node_id": rc.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "device": dev.label}
    if dev.note:   # a GPU Ray assigned that torch cannot use: this worker runs on CPU
        where["device_note"] = dev.note
    return where


def _trainable(config: dict, ctx=None) -> None:
    from ray import tune

    from search.trial import evaluate

    where = where_am_i(ctx)
    evaluate(ctx, config, lambda result: tune.report({**result, **where}))


class PrunedAwareOptunaSearch(OptunaSearch):
    """Ray's Optuna searcher, but a trial stopped early by the scheduler (fewer images than the
    full tuning set) is told to Optuna as PRUNED, not COMPLETE with its few-image score: TPE
    must not compare a 2-image mIoU with a 16-image one. Its per-rung values stay reported as
    intermediate values (``on_trial_result``), which TPE uses to rank pruned trials."""

    def __init__(self, *args, full_images: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_images = int(full_images)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error and int(result.get("images", 0)) < self.full_images:
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


def _tune_interrupted(before) -> bool:
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

    from search.progress import ProgressLine

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [callback, ProgressLine(plan.num_samples), JsonLoggerCallback()]


def make_sampler(name: str, seed: int, num_samples: int):
    """The Optuna sampler of ``--sampler``. ``tpe``: start-up of a quarter of the trials (2..10),
    ``constant_liar`` so that trials running at once see each other as bad results and parallel
    suggestions spread out instead of piling onto one point. ``random``: the i-th suggestion
    depends on the seed and i only, so a search gives the same trials at any concurrency."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(2, min(10, num_samples // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _new_tuner(plan, ctx, callback, trainable):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from search.space import optuna_space, trial0

    r, args = plan.resolved, plan.args
    sampler = make_sampler(getattr(args, "sampler", "tpe"), args.seed, plan.num_samples)
    searcher = PrunedAwareOptunaSearch(space=optuna_space(r.space), sampler=sampler,
                                       metric="score", mode="max",
                                       points_to_evaluate=[trial0(r.defaults, r.space)],
                                       full_images=plan.rungs[-1])
    scheduler = (ImageRungScheduler(plan.rungs, reduction_factor=2, metric="score", mode="max")
                 if len(plan.rungs) > 1 else FIFOScheduler())
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
    from search.orchestrate import scoped_env

    pending_limit = scoped_env({"TUNE_MAX_PENDING_TRIALS_PG":
                                str(max(1, min(slots, args.max_concurrent or slots)))})
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
    interrupted = _tune_interrupted(before)
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", []) or [])
    callback.reconcile(trials)   # a resumed search whose trials had all ended runs no step
    # Tune turns Ctrl-C into a graceful stop and returns; tell it apart from a finished search
    # so the runs end KILLED (not FINISHED) and the user is told to --resume.
    if interrupted or any(str(t.status) not in ("TERMINATED", "ERROR") for t in trials):
        raise KeyboardInterrupt
    ok = [res for res in results if res.error is None and res.metrics]
    if not ok:
        errors = [res.error for res in results if res.error is not None]
        user = next((u for u in map(_user_error, errors) if u is not None), None)
        if user is not None:
            raise OvssError(str(user))
        first = str(errors[0]).strip().splitlines()[-1] if errors else "no trial reported"
        raise OvssError(f"every trial failed: {first}")
    return results


def best_result(results, searched: list[str]) -> dict[str, Any]:
    """Best trial among those scored on the most images (ASHA-pruned trials saw fewer)."""
    rows = []
    for res in results:
        if res.error is not None or not res.metrics or "score" not in res.metrics:
            continue
        rows.append({"score": float(res.metrics["score"]),
                     "images": int(res.metrics.get("images", 0)),
                     "params": {k: res.config[k] for k in searched if k in res.config},
                     "metrics": dict(res.metrics), "trial_id": res.metrics.get("trial_id")})
    top = max(r["images"] for r in rows)
    full = [r for r in rows if r["images"] == top]
    return max(full, key=lambda r: r["score"]), rows


def best_config(plan, results, parent_id: str, callback, chosen: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, best, rows)``: the exported config of the best trial (``chosen``, a two-stage
    search's re-ranked winner from search/rerank.py, replaces the best proxy trial), that trial's
    row, and the rows of every scored trial."""
    from search.cache import code_version
    from search.space import full_params

    r = plan.resolved
    best, rows = best_result(results, list(r.space))
    best = chosen or best
    params = full_params(r.defaults, best["params"])
    best_run = callback.runs.get(best["trial_id"]) if best["trial_id"] else None
    config = {
        "method": r.method, "backbone_name": r.backbone_name, "backbone": r.backbone,
        "dataset": plan.dataset_name, "classes": plan.classes.to_dict(),
        "settings": r.settings, "params": params, "searched": sorted(r.space),
        "metric": {"name": plan.reward["name"], "value": best["score"],
                   "images": best["images"]},
        "provenance": {"parent_run_id": parent_id, "trial_run_id": best_run,
                       "tracking_uri": plan.tracking_uri, "code_version": code_version(r.method),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    if chosen is not None:
        config["rerank"] = chosen["record"]
    return config, best, rows


def log_search_outputs(client, parent_id: str, plan, ctx, results, callback,
                       chosen: dict[str, Any] | None = None, ray_done=None) -> dict[str, Any]:
    """Best config, plots and overlays on the parent run. ``ray_done()`` is called as soon as
    the overlays need no Ray task and no held-out image waits to be scored (then nothing after
    the tuning needs Ray)."""
    import yaml

    from search import tracking
    from search.holdout import holds_out

    r = plan.resolved
    config, best, rows = best_config(plan, results, parent_id, callback, chosen)
    params = config["params"]
    tracking.log_metrics(client, parent_id, {"best_score": best["score"],
                                             "trials": len(rows)}, 0)
    for k, v in best["params"].items():  # tags, not params: a resumed search may change them
        client.set_tag(parent_id, f"best.{k}", str(v))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        seg = _driver_segmenter(ctx)
        overlays = _overlays(ctx, params, d, seg, gpus=plan.args.gpus_per_trial)  # meanwhile
        if ray_done is not None and seg is not None and not holds_out(plan):
            ray_done()
        (d / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        client.log_artifact(parent_id, str(d / "best_config.yaml"))
        for png in _plots(rows, r, d):
            client.log_artifact(parent_id, str(png), "plots")
        for png in overlays():
            client.log_artifact(parent_id, str(png), "overlays")
        if ctx.fidelity and plan.reward["name"] != "miou":
            _fidelity(client, parent_id, rows, d)
    return best


def _plots(rows, r, out: Path) -> list[Path]:
    """Optuna's matplotlib plots of the trials, rebuilt as an in-memory study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from search.space import optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_space(r.space)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        if set(row["params"]) != set(dists):
            continue
        study.add_trial(optuna.trial.create_trial(params=row["params"], distributions=dists,
                                                  value=row["score"]))
    written = []
    for name, fn in [("optimization_history", ovm.plot_optimization_history),
                     ("param_importances", ovm.plot_param_importances),
                     ("slice", ovm.plot_slice)]:
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
            path = out / f"{name}.png"
            fig.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as e:  # e.g. importances need 2+ distinct trials
            print(f"plot {name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
    return written


#: Tuning images whose best-config overlays the parent run gets.
OVERLAY_IMAGES = 3


def _overlay_preds(ctx, params, n: int, seg=None):
    """Best-config label maps + images of the first ``n`` tuning images: in a Ray task (the
    driver never loads a model), or in the driver with ``seg``, a segmenter that decodes
    without its model (:func:`_driver_segmenter`)."""
    from search.trial import evidence_for, get_dataset, get_segmenter

    seg = seg if seg is not None else get_segmenter(ctx)
    data = get_dataset(ctx, labels="image" if ctx.reward["name"] == "clip" and not ctx.fidelity
                       else "dense")
    out = []
    for item in ctx.items[:n]:
        pred = np.asarray(seg.decode(evidence_for(ctx, item, params), params))
        out.append((item.image_id, data.image(item.index), pred))
    return out


def _driver_segmenter(ctx, n: int = OVERLAY_IMAGES):
    """A segmenter the driver can decode the first ``n`` tuning images with, without building
    a model: the cached decode head's (:func:`search.trial.head_segmenter`), the images'
    evidence cached and no knob-dependent extension. None otherwise (a Ray task decodes)."""
    from search.trial import get_cache, head_segmenter

    if ctx.extraction_knobs:
        return None
    cache = get_cache(ctx)
    if not all(cache.has(ctx.method, ctx.base_key(item)) for item in ctx.items[:n]):
        return None
    return head_segmenter(ctx, "cpu")


def _overlays(ctx, params, out: Path, seg=None, n: int = OVERLAY_IMAGES,
              gpus: float = 0.0):
    """Starts the overlays and returns a function that waits for them and returns the PNGs
    (image | overlay | label colours) written into ``out``. Decoded in the driver with ``seg``
    (from :func:`_driver_segmenter`: no worker to start, no model to load) on a thread, else in
    a Ray task; either runs while the driver makes the plots."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from search.evaluate import write_overlays

    if seg is None:
        task = ray.remote(_overlay_preds).options(num_gpus=gpus, max_retries=0)
        ref = task.remote(ctx, params, n)
        return lambda: write_overlays(out, ray.get(ref))
    # torch and zlib release the GIL: the plots go on meanwhile; result() re-raises a failure
    pool = ThreadPoolExecutor(1, thread_name_prefix="ovss-overlays")
    future = pool.submit(lambda: write_overlays(out, _overlay_preds(ctx, params, n, seg)))
    pool.shutdown(wait=False)
    return future.result


def _fidelity(client, parent_id: str, rows, out: Path) -> None:
    from rewards.fidelity import fidelity_report
    from search import tracking

    top = max(r["images"] for r in rows)
    use = [r for r in rows if r["images"] == top and "fidelity_miou" in r["metrics"]]
    if len(use) < 3:
        use = [r for r in rows if "fidelity_miou" in r["metrics"]]
    rewards = [r["score"] for r in use]
    mious = [float(r["metrics"]["fidelity_miou"]) for r in use]
    png = out / "fidelity_scatter.png"
    report = fidelity_report(rewards, mious, png)
    tracking.log_metrics(client, parent_id, report, 0)
    if png.exists():
        client.log_artifact(parent_id, str(png), "plots")


def write_offline_outputs(plan, results, parent_id: str, callback,
                          chosen: dict[str, Any] | None = None) -> Path:
    """The tracking store failed during the search: the best config goes next to Tune's results
    (``<storage>/<name>/best_config.yaml``), where ``python -m search.sync`` finds it."""
    import yaml

    from methods.io import atomic_write

    config, best, rows = best_config(plan, results, parent_id, callback, chosen)
    config["provenance"]["trials"] = len(rows)
    path = plan.storage / plan.name / "best_config.yaml"
    atomic_write(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path
