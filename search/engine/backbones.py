"""``search.run --backbone a,b,c`` (or ``all``), the driver of several searches: one search per
backbone in one Ray session, each in its own experiment (``<method>/<backbone>/<dataset>``),
then a summary run in ``<method>/all-backbones/<dataset>`` comparing them: best score, held-out
mIoU tuned vs paper default, trials and wall time, as metrics and a CSV / Markdown table."""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from methods.base import OvssError


def wants_many(backbone: str | None) -> bool:
    return bool(backbone) and ("," in backbone or backbone == "all")


def backbone_names(method: str, backbone: str) -> list[str]:
    """``all``: every backbone of the method YAML but the random-weight ``tiny:`` test ones
    (all of them when only those exist); else the comma list, each checked."""
    from methods.spec import load_method_spec

    spec = load_method_spec(method)
    if backbone == "all":
        real = [n for n, b in spec.backbones.items() if "tiny" not in (b.model_extra or {})]
        return real or list(spec.backbones)
    names = [b.strip() for b in backbone.split(",") if b.strip()]
    for n in names:
        if n not in spec.backbones:
            raise OvssError(f"unknown backbone {n!r} for method {method}: choose among "
                            f"{', '.join(spec.backbones)} or all")
    if len(set(names)) != len(names):
        raise OvssError(f"--backbone {backbone}: a backbone is named twice")
    return names


def run_backbones(args: argparse.Namespace) -> str:
    """Plan every search (all input checked before Ray), run them, log the summary run."""
    from mlflow.tracking import MlflowClient

    from search.engine.plan import plan_search
    from search.engine.search import run_search
    from search.engine.session import init_ray, shutdown_ray
    from search.record import tracking
    from search.record.tables import to_csv, to_markdown

    plans = []
    for name in backbone_names(args.method, args.backbone):
        a = copy.copy(args)
        a.backbone = name
        if args.name:
            a.name = f"{args.name}-{name}"
        plans.append(plan_search(a))
    started = init_ray(args.address)
    try:
        rows, summaries = [], []
        client = MlflowClient(plans[0].tracking_uri)
        for plan in plans:
            t0 = time.time()
            summaries.append(run_search(plan))
            wall = time.time() - t0
            r = plan.resolved
            exp = client.get_experiment_by_name(tracking.experiment_name(
                r.method, r.backbone_name, plan.dataset_name))
            run = tracking.previous_search(client, exp.experiment_id, plan.name)
            m = run.data.metrics
            rows.append({"": r.backbone_name, "best score": m.get("best_score", math.nan),
                         "holdout tuned": m.get("holdout_miou_best", math.nan),
                         "holdout default": m.get("holdout_miou_default", math.nan),
                         "holdout gap": m.get("holdout_miou_gap", math.nan),
                         "trials": int(m.get("trials", 0)), "wall s": round(wall, 1),
                         "run": run.info.run_id})
        p0 = plans[0]
        exp_id = tracking.ensure_experiment(client, tracking.experiment_name(
            p0.resolved.method, "all-backbones", p0.dataset_name))
        tags = {"ovss_role": "backbones", "ovss_method": p0.resolved.method,
                "ovss_dataset": p0.dataset_name,
                "ovss_backbones": ",".join(row[""] for row in rows),
                "ovss_search_runs": ",".join(row["run"] for row in rows)}
        with tracking.parent_run(client, exp_id, f"backbones-{p0.dataset_name}", tags) as rid:
            metrics: dict[str, Any] = {}
            for row in rows:
                for k in ("best score", "holdout tuned", "holdout default", "trials", "wall s"):
                    metrics[f"{row['']}/{k.replace(' ', '_')}"] = row[k]
            tracking.log_metrics(client, rid, metrics, 0)
            table = _table(rows)
            with tempfile.TemporaryDirectory() as d:
                for name, text in [("backbones.csv", to_csv(table)),
                                   ("backbones.md", to_markdown(table))]:
                    (Path(d) / name).write_text(text)
                    client.log_artifact(rid, str(Path(d) / name))
        best = max(rows, key=lambda row: row["best score"])
        return ("\n\n".join(summaries) + "\n\n" + to_markdown(
            table, f"{len(rows)} backbones of {p0.resolved.method} on {p0.dataset_name} "
            f"(scores in %)") + f"\nbest backbone: {best['']} (best score "
            f"{100 * best['best score']:.2f}); summary run {rid}")
    finally:
        if started:
            shutdown_ray()


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the Markdown / CSV table (scores as fractions; to_markdown shows percent)."""
    out = []
    for row in rows:
        out.append({"backbone": row[""], "best score": row["best score"],
                    "holdout tuned": row["holdout tuned"],
                    "holdout default": row["holdout default"], "holdout gap": row["holdout gap"],
                    "trials": str(row["trials"]), "wall s": f"{row['wall s']:.1f}",
                    "run": row["run"]})
    return out
