"""Score a tuned config on a whole split, optionally beside the paper defaults, and log it to
MLflow (the work of ``python -m search.evaluate``): one run tagged ``ovss_role=evaluation`` with
mIoU, aAcc, per-class IoU, the comparison table and overlays."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path

from methods.base import OvssError
from search.engine.scoring import Score


def evaluate(args: argparse.Namespace) -> str:
    from mlflow.tracking import MlflowClient

    from methods.mlflow_store import default_tracking_uri
    from search.engine.configs import check_classes, load_source, paper_config
    from search.engine.scoring import open_eval_data, score_config
    from search.engine.session import init_ray, shutdown_ray
    from search.record import tracking
    from search.record.tables import comparison_rows, to_markdown

    uri = args.tracking_uri or default_tracking_uri()
    config, source = load_source(args.config, args.run, args.model, uri)
    paper = paper_config(config) if args.baseline else None
    data = open_eval_data(args.dataset, args.data_root, args.split, args.max_images)
    check_classes(config, data)
    cache_dir = Path(args.cache_dir or Path(".ovss") / "cache").resolve()
    client = MlflowClient(uri)
    exp_name = tracking.experiment_name(config["method"], str(config.get("backbone_name") or
                                        config["backbone"].get("name")), args.dataset)
    started = init_ray(args.address)
    try:
        try:
            exp_id = tracking.ensure_experiment(client, exp_name)
        except Exception as e:
            raise OvssError(f"cannot open MLflow store {uri}: {str(e).splitlines()[0]}") \
                from None
        prov = config.get("provenance") or {}
        search_run = prov.get("parent_run_id") or prov.get("exported_from") or ""
        tags = {"ovss_role": "evaluation", "ovss_method": config["method"],
                "ovss_backbone": str(config.get("backbone_name", "")),
                "ovss_dataset": args.dataset, "ovss_split": args.split,
                "ovss_tuned_on": str(config.get("dataset", "")), "ovss_source": source,
                "ovss_search_run": search_run}
        name = f"eval-{config.get('dataset', 'config')}-on-{args.dataset}-{args.split}"
        with tracking.parent_run(client, exp_id, name, tags) as run_id:
            scores = {"tuned": score_config(config, data, cache_dir, args.gpus, args.cpus,
                                            desc="score tuned")}
            if paper is not None:
                scores["paper default"] = score_config(paper, data, cache_dir, args.gpus,
                                                       args.cpus, overlays=0,
                                                       desc="score default")
            rows = comparison_rows(scores)
            _log_evaluation(client, run_id, scores, rows, data)
        table = to_markdown(rows, f"{source} on {data.describe()}")
        return (f"{table}\nMLflow run {run_id} (experiment {exp_name!r}) at {uri}")
    finally:
        if started:
            shutdown_ray()


def _log_evaluation(client, run_id: str, scores: Mapping[str, Score], rows, data) -> None:
    from search.engine.overlays import write_overlays
    from search.record import tracking
    from search.record.tables import write_table

    tuned = scores["tuned"]
    metrics = {"miou": tuned.miou, "aacc": tuned.aacc, "images": tuned.images,
               **{f"iou/{c}": v for c, v in tuned.per_class.items()}}
    if "paper default" in scores:
        paper = scores["paper default"]
        metrics.update({"paper_miou": paper.miou, "paper_aacc": paper.aacc,
                        "gap_miou": tuned.miou - paper.miou,
                        "gap_aacc": tuned.aacc - paper.aacc,
                        **{f"paper_iou/{c}": v for c, v in paper.per_class.items()}})
    tracking.log_metrics(client, run_id, metrics, 0)
    tracking.log_params(client, run_id, {"dataset": data.dataset, "split":
                                         data.data_kwargs["split"], "images": len(data.items)})
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for p in write_table(d, "eval_table", rows, data.describe()):
            client.log_artifact(run_id, str(p))
        for p in write_overlays(d, tuned.overlays):
            client.log_artifact(run_id, str(p), "overlays")
