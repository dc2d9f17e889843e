"""The Ray parts of a search: the extraction pass (Ray tasks) and tuning (Ray Tune + Optuna +
ASHA), and what the parent MLflow run gets at the end (best config, plots, overlays)."""

from __future__ import annotations

import datetime as _dt
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from methods.base import OvssError


def _user_error(e: BaseException) -> OvssError | None:
    """The OvssError inside a Ray task / trial error, if there is one."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OvssError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return None


def _extract_task(ctx, item) -> bool:
    from search.trial import extract_item

    return extract_item(ctx, item)


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
    task = ray.remote(_extract_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    ctx_ref = ray.put(ctx)
    pending = [task.remote(ctx_ref, it) for it in todo]
    with tqdm(total=len(pending), desc="extract", unit="img", file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
            except Exception as e:
                for ref in pending:
                    ray.cancel(ref)
                user = _user_error(e)
                if user is not None:
                    raise OvssError(str(user)) from None
                raise
            bar.update(len(done))
    return len(todo)


def _trainable(config: dict, ctx=None) -> None:
    from ray import tune

    from search.trial import evaluate

    evaluate(ctx, config, tune.report)


def tune_search(plan, ctx, callback):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.progress import ProgressLine
    from search.space import optuna_space, trial0

    r, args = plan.resolved, plan.args
    if not r.space:
        raise OvssError("nothing to search: every knob of the space is fixed by --set")
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    path = plan.storage / plan.name
    # Tune keeps a single pending trial for a searcher by default, which on short trials leaves
    # all but one worker idle; allow as many pending trials as can run at once.
    import os

    import ray

    slots = int(ray.cluster_resources().get("CPU", 1) // max(args.cpus_per_trial, 1e-6))
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG",
                          str(max(1, min(slots, args.max_concurrent or slots))))
    if args.resume:
        if not tune.Tuner.can_restore(str(path)):
            raise OvssError(f"--resume: no interrupted search named {plan.name!r} under "
                            f"{plan.storage}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        # The pickled run config holds the old callback object; log through this run's one
        # (Tune then restores its checkpointed state: trial -> child run).
        tuner._local_tuner.get_run_config().callbacks = [callback, ProgressLine(plan.num_samples)]
    else:
        startup = max(2, min(10, plan.num_samples // 4))
        sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=startup)
        searcher = OptunaSearch(space=optuna_space(r.space), sampler=sampler, metric="score",
                                mode="max",
                                points_to_evaluate=[trial0(r.defaults, r.space)])
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(plan.rungs),
                                   grace_period=1, reduction_factor=2, metric="score",
                                   mode="max")
                     if len(plan.rungs) > 1 else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=plan.num_samples, reuse_actors=True,
                                        max_concurrent_trials=args.max_concurrent or None),
            run_config=tune.RunConfig(name=plan.name, storage_path=str(plan.storage),
                                      callbacks=[callback, ProgressLine(plan.num_samples)],
                                      verbose=0))
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # Tune's banners: stdout keeps the summary
        results = tuner.fit()
    # Tune turns Ctrl-C into a graceful stop and returns; tell it apart from a finished search
    # so the runs end KILLED (not FINISHED) and the user is told to --resume.
    if callback.unfinished() or len(callback.runs) < plan.num_samples:
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


def log_search_outputs(client, parent_id: str, plan, ctx, results, callback) -> dict[str, Any]:
    import yaml

    from search import tracking
    from search.cache import code_version
    from search.space import full_params

    r = plan.resolved
    best, rows = best_result(results, list(r.space))
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
    tracking.log_metrics(client, parent_id, {"best_score": best["score"],
                                             "trials": len(rows)}, 0)
    for k, v in best["params"].items():  # tags, not params: a resumed search may change them
        client.set_tag(parent_id, f"best.{k}", str(v))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        client.log_artifact(parent_id, str(d / "best_config.yaml"))
        for png in _plots(rows, r, d):
            client.log_artifact(parent_id, str(png), "plots")
        for png in _overlays(ctx, params, d, gpus=plan.args.gpus_per_trial):
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


def _overlay_preds(ctx, params, n: int):
    """Runs as a Ray task (the driver never loads a model): best-config label maps + images."""
    from search.trial import evidence_for, get_dataset, get_segmenter

    seg = get_segmenter(ctx)
    data = get_dataset(ctx, labels="image" if ctx.reward["name"] == "clip" and not ctx.fidelity
                       else "dense")
    out = []
    for item in ctx.items[:n]:
        pred = np.asarray(seg.decode(evidence_for(ctx, item, params), params))
        out.append((item.image_id, data.image(item.index), pred))
    return out


def _overlays(ctx, params, out: Path, n: int = 3, gpus: float = 0.0) -> list[Path]:
    import ray
    from PIL import Image

    from methods.infer import colorize, overlay

    task = ray.remote(_overlay_preds).options(num_gpus=gpus, max_retries=0)
    written = []
    for image_id, img, pred in ray.get(task.remote(ctx, params, n)):
        path = out / f"{image_id}_overlay.png"
        Image.fromarray(np.concatenate([img, overlay(img, pred), colorize(pred)], 1)).save(path)
        written.append(path)
    return written


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
