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
    return best


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
    from rewards.fidelity import fidelity_report
    from search.record import tracking

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


def finish_search(client, parent_id: str, plan, best: Mapping[str, Any],
                  ray_done=None) -> str:
    """After tuning: score the held-out images, write the parent run's description (best
    config, holdout comparison, export command). Returns extra summary lines ('' if none).
    ``ray_done()`` is called once nothing here needs Ray any more (after the holdout)."""
    import yaml

    from search.engine.holdout import score_holdout
    from search.record.tracking import ui_link

    r = plan.resolved
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
    export = (f"python -m search.export --method {r.method} --backbone {r.backbone_name} "
              f"--dataset {plan.dataset_name} --tracking-uri {plan.tracking_uri}")
    note = [f"## Best config ({plan.reward['name']} {best['score']:.4f} on "
            f"{best['images']} tuning images)", "", "```yaml",
            yaml.safe_dump(dict(best["params"]), sort_keys=False).strip(), "```", ""]
    if line:
        note += ["## Held-out images", "", line, "", getattr(plan, "holdout_table", ""), ""]
    note += ["## Export", "", f"`{export}`", "", "## Model", "", f"`{model_uri}` (serve: "
             f"`mlflow models serve -m {model_uri} --env-manager local`)", ""]
    client.set_tag(parent_id, "mlflow.note.content", "\n".join(note))
    ui = ui_link(plan.tracking_uri, client.get_run(parent_id).info.experiment_id)
    return "\n".join(x for x in [line, f"model: {model_uri}", f"runs table: {ui}"] if x)
