"""``python -m search.run``: one hyperparameter search of one method on one data set.

Flow (see ../DESIGN): validate everything -> start/join Ray -> parent MLflow run -> fill the
evidence cache with Ray tasks -> Ray Tune (Optuna TPE, paper defaults as trial 0, ASHA over growing
image subsets) -> best config, plots and overlays on the parent run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.base import OvssError

REWARDS = ("miou", "clip")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, exit 2) like every other."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from methods import known_methods

    p = OneLineParser(
        prog="python -m search.run",
        description="Search the knobs of a training-free OVSS method with Ray Tune + Optuna, "
                    "logging every trial to MLflow.")
    p.add_argument("--method", required=True, choices=known_methods(),
                   help="method family: pnp (PnP-OVSS), clipseg (CLIP CRA+DSI), fseg (FSeg-LLaVA)")
    p.add_argument("--backbone", help="backbone name from conf/methods/<method>.yaml "
                   "(default: the YAML's default_backbone, or the preset's); a,b,c or all: one "
                   "search per backbone, then a summary run comparing them")
    p.add_argument("--dataset", help="data set name from conf/datasets/ (voc21, voc20, "
                   "context59, context60, coco_object, coco_stuff164k, ade20k, cityscapes) or "
                   "'folder' for DIR/images, DIR/masks, DIR/classes.txt")
    p.add_argument("--data-root", help="root directory of the data set in its standard layout")
    p.add_argument("--split", default="val", help="data set split to tune on (default: val)")
    p.add_argument("--max-images", type=int, help="tune on the first N images of the split")
    p.add_argument("--holdout", type=int, help="keep N images out of tuning and score the best "
                   "config and the paper defaults on them after the search (default: a fifth of "
                   "the images from 20 on, none below)")
    p.add_argument("--eval-split", help="score the best config and the paper defaults on this "
                   "split after the search instead (all of it, or --holdout N images)")
    p.add_argument("--image-labels", help="JSON {image_id: [class names]} of image-level labels "
                   "(default for --reward clip: DATA_ROOT/image_labels.json)")
    p.add_argument("--reward", choices=REWARDS, default="miou",
                   help="objective: miou (dense labels) or clip (label-free CLIP contrastive "
                        "reward; needs only image-level labels)")
    p.add_argument("--reward-backbone", help="CLIP backbone of the clip reward "
                   "(conf/rewards/clip.yaml; default: its default_backbone)")
    p.add_argument("--fidelity", action="store_true",
                   help="with --reward clip on a labelled split: also score every trial with mIoU "
                        "(off the objective) and log rank correlations to the parent run")
    p.add_argument("--num-samples", type=int, help="number of trials (default 32; smoke: 8)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: "
                   "as many as the cluster's resources allow)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial (decode only), fractions allowed (default 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-extract", type=float, help="GPUs per extraction task (the model "
                   "forward; default: 1 when the cluster has GPUs, else 0). Trials only decode "
                   "cached evidence and ask for --gpus-per-trial")
    p.add_argument("--cpus-per-extract", type=float, default=1.0,
                   help="CPUs per extraction task (default 1)")
    p.add_argument("--autoscale", action="store_true", help="the cluster scales up on demand: "
                   "ask Ray's autoscaler for missing GPUs/CPUs instead of refusing")
    p.add_argument("--rungs", type=int, default=3,
                   help="ASHA rungs: trials are scored on growing image subsets (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler (default 0)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe",
                   help="Optuna sampler: tpe (default; TPE with constant liar) "
                   "or random (a baseline; the same seed gives the same trials whatever the "
                   "concurrency)")
    p.add_argument("--address", help="Ray cluster address to join (default: start Ray locally)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///./mlflow.db)")
    p.add_argument("--cache-dir", help="evidence cache directory (default ./.ovss/cache; on a "
                   "cluster, a directory every node mounts)")
    p.add_argument("--storage", help="Ray Tune results directory (default ./.ovss/ray_results)")
    p.add_argument("--name", help="search name, used by --resume (default: method-backbone-"
                   "dataset-reward)")
    p.add_argument("--preset", help="a preset of conf/methods/<method>.yaml: smoke (tiny "
                   "random-weight backbone of the real model class on a generated data set, "
                   "fully offline, 8 trials), or the method's own (clipseg: cra, sclip, naclip, "
                   "clearclip protocols; pnp: reference)")
    p.add_argument("--rerank-top", type=int, metavar="K", help="two-stage search: tune with the "
                   "method's cheaper `proxy` pipeline, then re-score the K best trials with the "
                   "full pipeline on all tuning images and pick the winner among them")
    p.add_argument("--register", metavar="NAME", help="register the tuned config's MLflow model "
                   "(logged on every search) in the Model Registry as NAME")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of the same --name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override: a knob (fixes it, e.g. tau=6), space.<knob>.<low|high|step|"
                        "log|choices>, settings.<name>, or backbone.<field> (e.g. "
                        "backbone.path=/ckpt)")
    return p


@dataclass
class Plan:
    """Everything a search needs, validated, before Ray starts."""

    args: argparse.Namespace
    resolved: Any
    dataset_name: str
    data_kwargs: dict
    classes: Any
    items: list
    rungs: list[int]
    reward: dict
    num_samples: int
    tracking_uri: str
    cache_dir: Path
    storage: Path
    name: str
    proxy: Any = None          # search.config.ProxySpec of a two-stage search, else None
    rerank_top: int = 0        # K of --rerank-top (0: one stage)
    holdout: Any = None  # search.evaluate.EvalData of the held-out images, or None
    holdout_note: str = ""  # which images are held out (printed once the search starts)


def plan_search(args: argparse.Namespace) -> Plan:
    """Validate config, data and reward; raise OvssError on the first problem."""
    from search import config as cfg
    from search.data import open_dataset
    from search.tracking import default_tracking_uri
    from search.trial import read_item

    _check_flags(args)
    spec = cfg.load_method_spec(args.method)
    preset = None
    if args.preset:
        if args.preset not in spec.presets:
            raise OvssError(f"--preset {args.preset!r}: method {args.method} has no such preset "
                            f"(choose one of {', '.join(spec.presets) or 'none'})")
        preset = spec.presets[args.preset]
    dataset = args.dataset or (preset.dataset if preset else None)
    if not dataset:
        raise OvssError("no data set: give --dataset (and --data-root)")
    backbone = args.backbone or (preset.backbone if preset else None)
    resolved = cfg.resolve(spec, backbone, dataset, cfg.parse_set(args.set), preset)
    if args.num_samples is not None and args.num_samples < 1:
        raise OvssError(f"--num-samples {args.num_samples}: must be at least 1")
    if args.gpus_per_trial < 0:
        raise OvssError(f"--gpus-per-trial {args.gpus_per_trial}: must not be negative")
    if args.gpus_per_extract is not None and args.gpus_per_extract < 0:
        raise OvssError(f"--gpus-per-extract {args.gpus_per_extract}: must not be negative")
    if args.cpus_per_extract <= 0:
        raise OvssError(f"--cpus-per-extract {args.cpus_per_extract}: must be positive")
    if args.rungs < 1:
        raise OvssError(f"--rungs {args.rungs}: must be at least 1")
    rerank_top = getattr(args, "rerank_top", None)
    if rerank_top is None and preset is not None:
        rerank_top = preset.rerank_top
    proxy = None
    if rerank_top is not None:
        if rerank_top < 1:
            raise OvssError(f"--rerank-top {rerank_top}: must be at least 1")
        proxy = cfg.resolve_proxy(spec, resolved, preset)

    root = args.data_root
    if root is None and args.preset == "smoke":   # only smoke brings its own data
        from search.data import dataset_layout
        from search.data.synthetic import make_dataset

        layout = dataset_layout(dataset)
        root = str(make_dataset(layout, Path(".ovss") / "smoke" / dataset, n=8, seed=0))
    if root is None:
        raise OvssError(f"no data root: give --data-root for data set {dataset!r}")
    labels_mode = "image" if (args.reward == "clip" and not args.fidelity) else "dense"
    data_kwargs = {"name": dataset, "root": str(Path(root).resolve()), "split": args.split,
                   "labels": labels_mode}
    if args.image_labels:
        data_kwargs["image_labels_file"] = str(Path(args.image_labels).resolve())
    _presence_source(resolved.settings, args, root, labels_mode, data_kwargs)
    data = open_dataset(**data_kwargs)
    max_images = args.max_images or (preset.max_images if preset else None)
    n = len(data) if not max_images else min(max_images, len(data))
    if n == 0:
        raise OvssError(f"data set {dataset!r} at {root} has no images in split {args.split!r}")
    items = []
    for i in range(n):
        # Every image (and, with dense labels, every label map) is read once here, so a corrupt
        # file or a label map of the wrong size stops the search before Ray starts.
        items.append(read_item(data, i, dense=labels_mode == "dense"))
    reward: dict[str, Any] = {"name": args.reward}
    if args.reward == "clip":
        reward.update(_reward_spec(args, preset))

    from search.holdout import split_holdout

    items, holdout, holdout_note = split_holdout(args, items, data_kwargs)
    rungs = _rungs(len(items), args.rungs)

    num_samples = args.num_samples or (preset.num_samples if preset and preset.num_samples
                                       else 32)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    name = args.name or f"{args.method}-{resolved.backbone_name}-{dataset}-{args.reward}"
    work = Path(".ovss")
    plan = Plan(args=args, resolved=resolved, dataset_name=dataset, data_kwargs=data_kwargs,
                classes=data.classes, items=items, rungs=rungs, reward=reward,
                num_samples=num_samples, tracking_uri=tracking_uri,
                cache_dir=Path(args.cache_dir or work / "cache").resolve(),
                storage=Path(args.storage or work / "ray_results").resolve(), name=name,
                proxy=proxy, rerank_top=int(rerank_top or 0), holdout=holdout,
                holdout_note=holdout_note)
    return plan


def _check_flags(args: argparse.Namespace) -> None:
    """The numeric flags, names and paths, before anything is read: OvssError naming the flag."""
    def at_least_1(flag: str, v: int | None, unset: str) -> None:
        if v is not None and v < 1:
            raise OvssError(f"{flag} {v}: must be at least 1 ({unset})")

    at_least_1("--num-samples", args.num_samples, "the number of trials")
    at_least_1("--max-images", args.max_images, "leave it out to tune on every image")
    at_least_1("--rungs", args.rungs, "1 scores every trial on every image")
    at_least_1("--max-concurrent", args.max_concurrent,
               "leave it out to run as many trials as the cluster's resources allow")
    for flag, v, least in [("--cpus-per-trial", args.cpus_per_trial, "positive"),
                           ("--gpus-per-trial", args.gpus_per_trial, "0 or more")]:
        if not math.isfinite(v) or v < 0 or (v == 0 and flag == "--cpus-per-trial"):
            raise OvssError(f"{flag} {v:g}: must be a finite number, {least}")
        if 0 < v < 1e-4:  # Ray's resource precision
            raise OvssError(f"{flag} {v:g}: fractions finer than 0.0001 are not possible")
    if not 0 <= args.seed < 2 ** 32:
        raise OvssError(f"--seed {args.seed}: must be in [0, 2**32)")
    if args.name is not None:
        n = args.name
        if (not n.strip() or n != n.strip() or n.startswith(".") or "/" in n or "\\" in n
                or not n.isprintable() or len(n) > 200):
            raise OvssError(f"--name {n!r}: a search name is one plain file name (no '/', no "
                            "leading '.', printable, at most 200 characters)")
    if args.tracking_uri:
        from urllib.parse import urlparse

        scheme = urlparse(args.tracking_uri).scheme.split("+")[0].lower()
        known = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                 "databricks")
        if scheme not in known and len(scheme) != 1:  # (one letter: a Windows drive)
            raise OvssError(f"--tracking-uri {args.tracking_uri}: unknown scheme {scheme!r} "
                            f"(use one of {', '.join(k for k in known if k)})")
    for flag, d in [("--cache-dir", args.cache_dir), ("--storage", args.storage)]:
        if d and Path(d).exists() and not Path(d).is_dir():
            raise OvssError(f"{flag} {d}: is a file, not a directory")


def _presence_source(settings: dict, args: argparse.Namespace, root, labels_mode: str,
                     data_kwargs: dict) -> str:
    """``settings.presence_source``, checked against what the data set can give: where the
    present classes handed to ``extract`` come from (see search.trial.SearchContext)."""
    from search.trial import PRESENCE_SOURCES

    source = settings.get("presence_source", "model")
    if source not in PRESENCE_SOURCES:
        raise OvssError(f"settings.presence_source {source!r}: choose one of "
                        f"{', '.join(PRESENCE_SOURCES)}")
    if source == "image_labels" and "image_labels_file" not in data_kwargs:
        default = Path(root) / "image_labels.json"
        if not default.is_file():
            raise OvssError("settings.presence_source image_labels: no image-label file (give "
                            f"--image-labels FILE, or put {default})")
        data_kwargs["image_labels_file"] = str(default.resolve())
    if source == "ground_truth" and labels_mode != "dense":
        raise OvssError("settings.presence_source ground_truth reads the dense label maps: with "
                        "--reward clip add --fidelity on a labelled split, or use image_labels")
    return source


def _rungs(n: int, k: int) -> list[int]:
    """Cumulative image counts of ``k`` rungs growing by 2x and ending at ``n``."""
    sizes = sorted({max(1, math.ceil(n / 2 ** (k - 1 - i))) for i in range(k)})
    return sizes


def _reward_spec(args: argparse.Namespace, preset) -> dict[str, Any]:
    import yaml

    from methods.base import CONF_DIR

    path = CONF_DIR / "rewards" / "clip.yaml"
    conf = yaml.safe_load(path.read_text())
    name = args.reward_backbone or ("tiny" if args.preset == "smoke"
                                    else conf["default_backbone"])
    if name not in conf["backbones"]:
        raise OvssError(f"unknown --reward-backbone {name!r}: choose one of "
                        f"{', '.join(conf['backbones'])}")
    return {"backbone": {"name": name, **conf["backbones"][name]},
            "settings": conf.get("settings", {})}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from search.backbones import run_backbones, wants_many
        from search.orchestrate import run_search

        if wants_many(args.backbone):
            summary = run_backbones(args)  # one search per backbone + a summary run
        else:
            plan = plan_search(args)
            summary = run_search(plan)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: runs marked KILLED; continue with --resume", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
