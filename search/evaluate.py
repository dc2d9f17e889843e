"""``python -m search.evaluate``: score a tuned config on a whole split with the standard protocol.

    python -m search.evaluate --config conf/tuned/clipseg-openai-vit-b16-voc21.yaml \\
        --dataset voc21 --data-root /data/VOC2012 --baseline paper

The config comes from a file (``search.export`` output or a search's ``best_config.yaml``), a
search run (``--run RUN_ID``) or a registered model (``--model models:/NAME/VERSION``). The
config carries its knobs, backbone and settings; the test data set brings its classes. Scoring is
the confusion-matrix mIoU of ``rewards.miou`` (mmsegmentation's protocol, 255 ignored) summed over
every image of the split. Extraction runs as Ray tasks through the search's evidence cache (a
config evaluated on the images it was tuned on extracts nothing); decoding runs as Ray tasks over
chunks of images whose confusion matrices are summed in the driver.

The same code scores the held-out images of a search (:mod:`search.holdout`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from methods.base import OvssError

REQUIRED = ("method", "backbone", "settings", "params")


# --- the images -------------------------------------------------------------------------------
@dataclass
class EvalData:
    """The images to score: ``items`` index the data set opened with ``data_kwargs``."""

    dataset: str
    data_kwargs: dict[str, Any]
    classes: Any                     # methods.base.ClassSet of the test data set
    items: list = field(default_factory=list)   # search.trial.ImageItem

    def describe(self) -> str:
        ids = [it.image_id for it in self.items]
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        return f"{self.dataset} {self.data_kwargs['split']}: {shown}"


def image_items(data, indices: Sequence[int]) -> list:
    """One :class:`search.trial.ImageItem` per index, reading each image and label map once so
    a corrupt file or a label map of the wrong size stops before Ray starts."""
    from search.trial import read_item

    return [read_item(data, i, dense=True) for i in indices]


def open_eval_data(dataset: str, root: str | Path, split: str = "val",
                   max_images: int | None = None) -> EvalData:
    """The first ``max_images`` (default all) images of a split, with dense labels."""
    from search.data import open_dataset

    if max_images is not None and max_images < 1:
        raise OvssError(f"--max-images {max_images}: must be at least 1")
    kw = {"name": dataset, "root": str(Path(root).resolve()), "split": split, "labels": "dense"}
    data = open_dataset(**kw)
    n = len(data) if max_images is None else min(max_images, len(data))
    if n == 0:
        raise OvssError(f"data set {dataset!r} at {root} has no images in split {split!r}")
    return EvalData(dataset, kw, data.classes, image_items(data, range(n)))


# --- the configs ------------------------------------------------------------------------------
def required_knobs(config: Mapping[str, Any]) -> list[str]:
    """Every knob decode reads: the method YAML's defaults after the backbone's overrides."""
    from search.config import load_method_spec

    spec = load_method_spec(config["method"])
    bb = spec.backbones.get(str(config.get("backbone_name") or config["backbone"].get("name")))
    return list({**spec.defaults, **(bb.defaults if bb else {})})


def check_config(config: Any, what: str) -> dict[str, Any]:
    """OvssError naming the first missing field or knob of a tuned config."""
    if not isinstance(config, dict):
        raise OvssError(f"{what}: expected a mapping (a tuned config)")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise OvssError(f"{what}: tuned config lacks {', '.join(missing)}")
    from methods import method_module_name

    method_module_name(config["method"])  # unknown method -> one line
    knobs = [k for k in required_knobs(config) if k not in config["params"]]
    if knobs:
        raise OvssError(f"{what}: tuned config lacks knob(s) {', '.join(knobs)} of method "
                        f"{config['method']}")
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    from methods.infer import read_config_file

    return check_config(read_config_file(path), str(path))


def config_from_run(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The ``best_config.yaml`` artifact of a search run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise OvssError(f"no MLflow run {run_id!r} in {tracking_uri}") from None
    with tempfile.TemporaryDirectory() as d:
        try:
            local = client.download_artifacts(run_id, "best_config.yaml", d)
        except Exception:
            raise OvssError(f"run {run_id} has no best_config.yaml artifact (not a finished "
                            "search run)") from None
        config = yaml.safe_load(Path(local).read_text())
    config.setdefault("provenance", {}).setdefault("parent_run_id", run_id)
    return check_config(config, f"run {run_id}")


def load_source(config: str | None, run: str | None, model: str | None,
                tracking_uri: str) -> tuple[dict[str, Any], str]:
    """(tuned config, a one-word description of where it came from)."""
    if model:
        from search.model import config_from_model_uri

        return check_config(config_from_model_uri(model, tracking_uri), model), model
    if run:
        return config_from_run(run, tracking_uri), f"run:{run}"
    return load_config_file(config), str(config)


def dataset_settings(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The config's settings, with the method YAML's ``datasets.<dataset>.settings`` applied when
    the test data set is not the one it was tuned on (a data set brings its own settings)."""
    from search.config import load_method_spec

    settings = dict(config["settings"])
    if dataset != config.get("dataset"):
        spec = load_method_spec(config["method"])
        if dataset in spec.datasets:
            settings.update(spec.datasets[dataset].settings)
    return settings


def paper_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its knobs replaced by the method's paper defaults (the YAML ``defaults``
    after the backbone's overrides, as :func:`search.config.resolve` gives them)."""
    from search.config import load_method_spec, resolve

    spec = load_method_spec(config["method"])
    name = config.get("backbone_name") or config["backbone"].get("name")
    if name not in spec.backbones:
        raise OvssError(f"--baseline paper: backbone {name!r} of the config is not in "
                        f"conf/methods/{config['method']}.yaml")
    resolved = resolve(spec, name, config.get("dataset"))
    return {**config, "params": dict(resolved.defaults)}


# --- scoring ----------------------------------------------------------------------------------
@dataclass
class Score:
    """mIoU and aAcc in [0, 1] over ``images``; ``per_class`` IoU by class name (NaN: absent
    from both prediction and ground truth); ``overlays``: (image id, image, label map)."""

    miou: float
    aacc: float
    per_class: dict[str, float]
    images: int
    overlays: list = field(default_factory=list)


def context_for(config: Mapping[str, Any], data: EvalData, cache_dir: str | Path,
                device: str = "cpu"):
    """A :class:`search.trial.SearchContext` for scoring ``config`` on ``data``; its cache keys
    are those of a search of the same backbone, settings and classes, so evidence is shared."""
    from methods import get_segmenter_class
    from search.orchestrate import _settings_key
    from search.trial import SearchContext

    seg_cls = get_segmenter_class(config["method"])
    ctx = SearchContext(
        method=config["method"], backbone=dict(config["backbone"]),
        settings=dataset_settings(config, data.dataset), defaults=dict(config["params"]),
        classes=data.classes.to_dict(), dataset=dict(data.data_kwargs), items=list(data.items),
        rungs=[len(data.items)], reward={"name": "miou"}, cache_dir=str(cache_dir),
        extraction_knobs=tuple(seg_cls.extraction_knobs), device=device)
    ctx.settings_key = _settings_key(ctx)
    return ctx


def _score_chunk(ctx, params: dict, items: list, n_overlays: int):
    """Ray task: decode ``items`` with ``params``; returns (confusion matrix, overlays)."""
    from rewards.miou import ConfusionMatrix
    from search.trial import check_prediction, evidence_for, get_dataset, get_segmenter

    seg = get_segmenter(ctx)
    data = get_dataset(ctx, labels="dense")
    cm = ConfusionMatrix(len(ctx.classes["names"]), data.ignore_index)
    overlays = []
    for k, item in enumerate(items):
        pred = np.asarray(seg.decode(evidence_for(ctx, item, params), params))
        label = data.label(item.index)
        check_prediction(pred, label.shape, cm.num_classes, item.image_id)
        cm.update(pred, label)
        if k < n_overlays:
            overlays.append((item.image_id, data.image(item.index), pred.astype(np.int32)))
    return cm.mat, overlays


def score_config(config: Mapping[str, Any], data: EvalData, cache_dir: str | Path,
                 gpus: float = 0.0, cpus: float = 1.0, overlays: int = 3,
                 desc: str = "score") -> Score:
    """Extract (Ray tasks, cached) and decode + score (Ray tasks over chunks) every image."""
    import ray
    from tqdm import tqdm

    from rewards.miou import ConfusionMatrix
    from search.tune import _user_error, extraction_pass

    ctx = context_for(config, data, cache_dir, "cuda" if gpus > 0 else "cpu")
    extraction_pass(ctx, gpus, cpus)
    params = dict(config["params"])
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-6)))
    n_chunks = max(1, min(len(data.items), 2 * slots))
    chunks = [c.tolist() for c in np.array_split(np.arange(len(data.items)), n_chunks)]
    task = ray.remote(_score_chunk).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    ctx_ref = ray.put(ctx)
    pending = {task.remote(ctx_ref, params, [data.items[i] for i in c],
                           overlays if j == 0 else 0): len(c) for j, c in enumerate(chunks)}
    cm = ConfusionMatrix(len(data.classes.names), 255)
    shown = []
    with tqdm(total=len(data.items), desc=desc, unit="img", file=sys.stderr) as bar:
        refs = list(pending)
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            try:
                mat, ov = ray.get(done[0])
            except Exception as e:
                for r in refs:
                    ray.cancel(r)
                user = _user_error(e)
                if user is not None:
                    raise OvssError(str(user)) from None
                raise
            cm.mat += mat
            shown.extend(ov)
            bar.update(pending[done[0]])
    ious = cm.iou()
    return Score(miou=cm.miou(), aacc=cm.aacc(),
                 per_class=dict(zip(data.classes.names, map(float, ious))),
                 images=len(data.items), overlays=shown)


# --- tables -----------------------------------------------------------------------------------
def comparison_rows(scores: Mapping[str, Score]) -> list[dict[str, Any]]:
    """Rows ``{"": name, <label>: value, ..., "difference": first - second}`` for mIoU, aAcc and
    each class (IoU), values in [0, 1] (NaN where a class is absent from prediction and truth)."""
    labels = list(scores)
    first = next(iter(scores.values()))
    rows = []
    for name in ["mIoU", "aAcc", *first.per_class]:
        row: dict[str, Any] = {"": name}
        for lab in labels:
            s = scores[lab]
            row[lab] = {"mIoU": s.miou, "aAcc": s.aacc}.get(name, s.per_class.get(name, math.nan))
        if len(labels) == 2:
            row["difference"] = row[labels[0]] - row[labels[1]]
        rows.append(row)
    return rows


def _fmt(v: Any, pct: bool = True) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{100 * v:.2f}" if pct else f"{v:.4f}")
    return str(v)


def to_markdown(rows: Sequence[Mapping[str, Any]], note: str = "") -> str:
    """A Markdown table, values in percent (mIoU/IoU/aAcc x 100), ``-`` for NaN."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return (note + "\n\n" if note else "") + "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of the rows, values as fractions in [0, 1] (empty for NaN)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in r.items()})
    return buf.getvalue()


def write_table(out: Path, stem: str, rows, note: str = "") -> list[Path]:
    (out / f"{stem}.csv").write_text(to_csv(rows))
    (out / f"{stem}.md").write_text(to_markdown(rows, note))
    return [out / f"{stem}.csv", out / f"{stem}.md"]


def write_overlays(out: Path, overlays) -> list[Path]:
    """``(image_id, image, label map)`` triples as ``<image_id>_overlay.png`` panels in ``out``
    (image | overlay | label colours), for MLflow artifacts: zlib level 1, half the time of
    PIL's default level 6 for files ~3 % larger."""
    from PIL import Image

    from methods.infer import colorize, overlay

    paths = []
    for image_id, img, pred in overlays:
        p = out / f"{image_id}_overlay.png"
        Image.fromarray(np.concatenate([img, overlay(img, pred), colorize(pred)], 1)
                        ).save(p, compress_level=1)
        paths.append(p)
    return paths


# --- the command ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.evaluate",
                                description="Score a tuned config on a whole split (mIoU, aAcc, "
                                            "per-class IoU), optionally beside the paper "
                                            "defaults, and log it to MLflow.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="tuned config YAML (search.export / best_config.yaml)")
    src.add_argument("--run", help="MLflow run id of a search (its best_config.yaml)")
    src.add_argument("--model", help="registered model: models:/NAME/VERSION")
    p.add_argument("--dataset", required=True, help="data set to score on (conf/datasets/)")
    p.add_argument("--data-root", required=True, help="its root directory")
    p.add_argument("--split", default="val", help="split (default: val)")
    p.add_argument("--max-images", type=int, help="score the first N images only")
    p.add_argument("--baseline", choices=["paper"], help="paper: also score the method's paper "
                   "defaults on the same images and show the difference")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per Ray task (default 0)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per Ray task (default 1)")
    p.add_argument("--address", help="Ray cluster address to join (default: start Ray locally)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                   "or sqlite:///./mlflow.db)")
    p.add_argument("--cache-dir", help="evidence cache directory (default ./.ovss/cache)")
    return p


def evaluate(args: argparse.Namespace) -> str:
    from mlflow.tracking import MlflowClient

    from search import tracking
    from search.orchestrate import init_ray, shutdown_ray

    uri = args.tracking_uri or tracking.default_tracking_uri()
    config, source = load_source(args.config, args.run, args.model, uri)
    paper = paper_config(config) if args.baseline else None
    data = open_eval_data(args.dataset, args.data_root, args.split, args.max_images)
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
    from search import tracking

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = evaluate(args)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
