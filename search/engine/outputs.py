"""Phases 7 and 8 of a search (docs/architecture.md), its outputs on the parent run: the best config
(YAML artifact), Optuna's plots, the overlays, the fidelity scatter of a label-free search; then,
once the held-out images are scored, the description (best config, holdout comparison, export
command) and the MLflow model. When the store failed during the search, the best config goes to disk
instead for ``python -m search.sync``."""

from __future__ import annotations

import datetime as _dt
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def best_config(plan, results, parent_id: str, callback, chosen: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, best, rows)``: the exported config of the best trial (``chosen``, a two-stage
    search's re-ranked winner from :mod:`search.engine.rerank`, replaces the best proxy trial),
    that trial's row, and the rows of every scored trial."""
    from search.core.cache import code_version
    from search.core.space import full_params
    from search.engine.tuning import best_result

    r = plan.resolved
    cost = getattr(plan, "cost", None)
    best, rows = best_result(results, list(r.space), cost.budget if cost is not None else None)
    best = chosen or best
    params = full_params(r.defaults, best["params"])
    best_run = callback.runs.get(best["trial_id"]) if best["trial_id"] else None
    config = {
        "method": r.method, "backbone_name": r.backbone_name, "backbone": r.backbone,
        "dataset": plan.dataset_name, "classes": plan.classes.to_dict(),
        "settings": r.settings, "params": params, "searched": sorted(r.space),
        "defaults": dict(r.defaults),     # trial 0 (a preset's), the paper baseline of evaluate
        "metric": {"name": plan.reward["name"], "value": best["score"],
                   "images": best["images"]},
        "provenance": {"parent_run_id": parent_id, "trial_run_id": best_run,
                       "tracking_uri": plan.tracking_uri, "code_version": code_version(r.method),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    if best.get("seconds") is not None:   # a cost-aware search: what the config costs
        config["cost"] = {"seconds_per_image": best["seconds"],
                          "device_kind": getattr(cost, "device_kind", None),
                          "budget": cost.budget if cost is not None else None}
    if chosen is not None:
        config["rerank"] = chosen["record"]
    return config, best, rows


def log_search_outputs(client, parent_id: str, plan, ctx, results, callback,
                       chosen: dict[str, Any] | None = None, ray_done=None) -> dict[str, Any]:
    """Best config, plots and overlays on the parent run. ``ray_done()`` is called as soon as
    the overlays need no Ray task and no held-out image waits to be scored (then nothing after
    the tuning needs Ray)."""
    import yaml

    from search.engine.holdout import holds_out
    from search.engine.overlays import driver_segmenter, start_overlays
    from search.record import tracking

    r = plan.resolved
    config, best, rows = best_config(plan, results, parent_id, callback, chosen)
    params = config["params"]
    tracking.log_metrics(client, parent_id, {"best_score": best["score"],
                                             "trials": len(rows)}, 0)
    for k, v in best["params"].items():  # tags, not params: a resumed search may change them
        client.set_tag(parent_id, f"best.{k}", str(v))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        seg = driver_segmenter(ctx)
        overlays = start_overlays(ctx, params, d, seg, gpus=plan.args.gpus_per_trial)  # meanwhile
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
    if plan.reward["name"] != "miou":
        constant_reward(client, parent_id, plan, rows)
    return best


def constant_reward(client, parent_id: str, plan, rows) -> None:
    """A label-free search whose reward is the same for every fully scored trial ranks nothing:
    say so, and why (the reward's own counts), in one line and the tag
    ``ovss_reward_constant``."""
    from rewards.clip_contrastive import why_constant
    from search.core.console import percent, score_name

    top = max(r["images"] for r in rows)
    full = [r for r in rows if r["images"] == top]
    if len(full) < 2 or len({float(r["score"]) for r in full}) > 1:
        return
    why = why_constant([r["metrics"] for r in full])
    line = (f"the {score_name(plan.reward['name'])} was {percent(full[0]['score'])} for all "
            f"{len(full)} trials scored on every image, so it ranks no config: {why}")
    client.set_tag(parent_id, "ovss_reward_constant", line)
    print(f"note: {line}", file=sys.stderr)


def _plots(rows, r, out: Path) -> list[Path]:
    """Optuna's matplotlib plots of the trials, rebuilt as an in-memory study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from search.core.space import optuna_space

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


def _fidelity(client, parent_id: str, rows, out: Path) -> None:
    """The fidelity report of a label-free search on the parent run; when its rank correlations
    are undefined, the tags ``ovss_undefined/fidelity_*`` say why and so does one line."""
    from rewards.fidelity import fidelity_report, undefined_reason
    from search.record import tracking

    top = max(r["images"] for r in rows)
    use = [r for r in rows if r["images"] == top and "fidelity_miou" in r["metrics"]]
    if len(use) < 3:
        use = [r for r in rows if "fidelity_miou" in r["metrics"]]
    rewards = [r["score"] for r in use]
    mious = [float(r["metrics"]["fidelity_miou"]) for r in use]
    png = out / "fidelity_scatter.png"
    report = fidelity_report(rewards, mious, png)
    why = undefined_reason(rewards, mious, ("the CLIP reward", "mIoU"))
    tracking.log_metrics(client, parent_id, report, 0,
                         why={k: why for k in ("fidelity_spearman", "fidelity_kendall")})
    if why:
        print(f"fidelity: rank correlations undefined: {why}", file=sys.stderr)
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


def export_command(plan) -> str:
    """``python -m search.export ...`` for this search's best config, runnable as printed
    (:func:`search.core.console.python_command`)."""
    from search.core.console import python_command

    r = plan.resolved
    return python_command("-m", "search.export", "--method", r.method, "--backbone",
                          r.backbone_name, "--dataset", plan.dataset_name, "--tracking-uri",
                          plan.tracking_uri)


def finish_search(client, parent_id: str, plan, best: Mapping[str, Any],
                  ray_done=None) -> list[str]:
    """After tuning: score the held-out images, write the parent run's description (best
    config, holdout comparison, export command). Returns summary lines (the held-out comparison
    if any, the model). ``ray_done()`` is called once nothing here needs Ray any more (after the
    holdout)."""
    import yaml

    from search.core.console import mlflow_command, score_text
    from search.engine.holdout import score_holdout

    line = score_holdout(client, parent_id, plan, best["params"])
    if ray_done is not None:
        ray_done()
    with tempfile.TemporaryDirectory() as d:
        config = yaml.safe_load(Path(client.download_artifacts(parent_id, "best_config.yaml",
                                                               d)).read_text())
    from search.record.model import log_tuned_model

    model_uri = log_tuned_model(plan.tracking_uri, parent_id, config,
                                getattr(plan.args, "register", None))
    client.set_tag(parent_id, "ovss_model_uri", model_uri)
    note = [f"## Best config ({score_text(plan.reward['name'], best['score'])} on "
            f"{best['images']} tuning images)", "", "```yaml",
            yaml.safe_dump(dict(best["params"]), sort_keys=False).strip(), "```", ""]
    if line:
        note += ["## Held-out images", "", line, "", getattr(plan, "holdout_table", ""), ""]
    serve = mlflow_command("models", "serve", "-m", model_uri, "--env-manager", "local")
    note += ["## Export", "", f"`{export_command(plan)}`", "", "## Model", "",
             f"`{model_uri}` (serve: `{serve}`)", ""]
    client.set_tag(parent_id, "mlflow.note.content", "\n".join(note))
    return [x for x in [line, f"model: {model_uri}"] if x]
