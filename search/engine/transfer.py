"""Does a config tuned on one data set hold on another? (the work of ``python -m
search.transfer``)

Rows: where each config was tuned (its ``dataset`` field), plus one paper-defaults row per
(method, backbone) among the configs; columns: the data sets it is tested on; cells: mIoU (%) with
the protocol of :mod:`search.engine.scoring`; last, the ``--warm-start RUN`` flag that starts a
search on another data set from the row's search (docs/cost.md). Logged on one MLflow run
(``ovss_role=transfer``) as ``transfer_table.csv`` / ``.md`` and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from methods.base import OvssError
from search.engine.configs import check_classes, load_config_file, paper_config
from search.engine.scoring import open_eval_data, score_config
from search.record.tables import to_csv, to_markdown


def parse_datasets(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["voc21=/data/voc"]`` -> ``[("voc21", "/data/voc")]``; OvssError on a bad item."""
    out = []
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise OvssError(f"--dataset {item!r}: expected NAME=ROOT (e.g. voc21=/data/VOC2012)")
        out.append((name.strip(), root.strip()))
    if len({n for n, _ in out}) != len(out):
        raise OvssError("--dataset: each data set name may appear once")
    return out


def row_configs(paths: Sequence[str], paper: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(row label, config) per tuned config, then a paper-defaults row per (method, backbone)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    seen_models: dict[tuple[str, str], dict[str, Any]] = {}
    for p in paths:
        cfg = load_config_file(p)
        model = (cfg["method"], str(cfg.get("backbone_name") or cfg["backbone"].get("name")))
        label = f"tuned on {cfg.get('dataset', Path(p).stem)} ({model[0]}/{model[1]})"
        if label in {r for r, _ in rows}:
            label = f"{label} [{Path(p).name}]"
        rows.append((label, cfg))
        seen_models.setdefault(model, cfg)
    if paper:
        for (method, bb), cfg in seen_models.items():
            rows.append((f"paper defaults ({method}/{bb})", paper_config(cfg)))
    return rows


def warm_start_flag(config: dict[str, Any]) -> str:
    """The ``search.run`` flag that starts a new search from the search a tuned config came
    from (``--warm-start <its parent run id>``); empty for a paper-defaults row."""
    run = (config.get("provenance") or {}).get("parent_run_id")
    return f"--warm-start {run}" if run else ""


def heatmap(table: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """mIoU (%) per (row, column) as an annotated image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[r[c] for c in columns] for r in table], float) * 100
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(columns), 1.0 + 0.5 * len(table)))
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), [f"tested on {c}" for c in columns])
    ax.set_yticks(range(len(table)), [r[""] for r in table])
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j]
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if not math.isnan(v) and v < 60 else "black")
    fig.colorbar(im, ax=ax, label="mIoU (%)")
    ax.set_title("mIoU: tuned on (rows) / tested on (columns)")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def transfer(args: argparse.Namespace) -> str:
    from mlflow.tracking import MlflowClient

    from methods.mlflow_store import default_tracking_uri
    from search.engine.session import init_ray, shutdown_ray
    from search.record import tracking

    datasets = parse_datasets(args.dataset)
    rows = row_configs(args.config, paper=not args.no_paper)
    data = {name: open_eval_data(name, root, args.split, args.max_images)
            for name, root in datasets}           # every input checked before Ray starts
    for _, cfg in rows:
        for d in data.values():
            check_classes(cfg, d)
    uri = args.tracking_uri or default_tracking_uri()
    cache_dir = Path(args.cache_dir or Path(".ovss") / "cache").resolve()
    client = MlflowClient(uri)
    started = init_ray(args.address)
    try:
        try:
            exp_id = tracking.ensure_experiment(client, args.experiment)
        except Exception as e:
            raise OvssError(f"cannot open MLflow store {uri}: {str(e).splitlines()[0]}") \
                from None
        tags = {"ovss_role": "transfer", "ovss_datasets": ",".join(data),
                "ovss_configs": ",".join(str(p) for p in args.config)}
        with tracking.parent_run(client, exp_id, "transfer", tags) as run_id:
            table = []
            metrics = {}
            for label, cfg in rows:
                row: dict[str, Any] = {"": label}
                for name, d in data.items():
                    s = score_config(cfg, d, cache_dir, args.gpus, args.cpus, overlays=0,
                                     desc=f"{label[:30]} on {name}")
                    row[name] = s.miou
                    metrics[f"miou/{label}/{name}"] = s.miou
                row["warm start"] = ("" if label.startswith("paper defaults")
                                     else warm_start_flag(cfg))
                table.append(row)
            tracking.log_metrics(client, run_id, metrics, 0)
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                (tmp / "transfer_table.csv").write_text(to_csv(table))
                (tmp / "transfer_table.md").write_text(to_markdown(table, _note(data)))
                heatmap(table, list(data), tmp / "transfer_heatmap.png")
                for f in ("transfer_table.csv", "transfer_table.md", "transfer_heatmap.png"):
                    client.log_artifact(run_id, str(tmp / f))
        return (to_markdown(table, "mIoU (%): " + _note(data))
                + f"\nMLflow run {run_id} (experiment {args.experiment!r}) at {uri}")
    finally:
        if started:
            shutdown_ray()


def _note(data) -> str:
    return "; ".join(f"{n}: {len(d.items)} images of {d.data_kwargs['split']}, "
                     f"{len(d.classes.names)} classes" for n, d in data.items())
