"""Phase 1 of a search (docs/architecture.md), the plan: every input validated (method spec,
``--set``, data set, images, reward, flags), held-out images chosen, before Ray starts. Each failure
is one ``OvssError`` line naming the flag or key."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.base import OvssError


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
    proxy: Any = None          # methods.spec.ProxySpec of a two-stage search, else None
    rerank_top: int = 0        # K of --rerank-top (0: one stage)
    holdout: Any = None  # search.engine.scoring.EvalData of the held-out images, or None
    holdout_note: str = ""  # which images are held out (printed once the search starts)
    cost: Any = None   # search.engine.objectives.CostPlan: objectives, budget, patience, warm


def plan_search(args: argparse.Namespace) -> Plan:
    """Validate config, data and reward; raise OvssError on the first problem."""
    from methods.mlflow_store import default_tracking_uri
    from methods.spec import load_method_spec
    from search.core import config as cfg
    from search.core.trial import read_item
    from search.data import open_dataset
    from search.engine.objectives import cost_plan, reward_and_objectives

    _check_flags(args)
    _, objectives = reward_and_objectives(args)   # sets args.reward
    spec = load_method_spec(args.method)
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
    from methods import get_segmenter_class

    resolved.settings = get_segmenter_class(args.method).search_settings(
        resolved.backbone, resolved.settings, resolved.defaults,
        {k: p.model_dump(exclude_none=True) for k, p in resolved.space.items()})
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
    if root is None and (args.preset or "").startswith("smoke"):   # smoke* bring their data
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
    get_segmenter_class(args.method).check_classes(resolved.settings, data.classes)
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

    from search.engine.holdout import split_holdout

    items, holdout, holdout_note = split_holdout(args, items, data_kwargs)
    rungs = _rungs(len(items), args.rungs)

    num_samples = args.num_samples or (preset.num_samples if preset and preset.num_samples
                                       else 32)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    name = args.name or f"{args.method}-{resolved.backbone_name}-{dataset}-{args.reward}"
    cost = cost_plan(args, objectives, resolved, tracking_uri, int(rerank_top or 0))
    work = Path(".ovss")
    plan = Plan(args=args, resolved=resolved, dataset_name=dataset, data_kwargs=data_kwargs,
                classes=data.classes, items=items, rungs=rungs, reward=reward,
                num_samples=num_samples, tracking_uri=tracking_uri,
                cache_dir=Path(args.cache_dir or work / "cache").resolve(),
                storage=Path(args.storage or work / "ray_results").resolve(), name=name,
                proxy=proxy, rerank_top=int(rerank_top or 0), holdout=holdout,
                holdout_note=holdout_note, cost=cost)
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
    present classes handed to ``extract`` come from (see search.core.trial.SearchContext)."""
    from search.core.trial import PRESENCE_SOURCES

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
    name = args.reward_backbone or ("toy-clip" if args.preset == "smoke"
                                    else conf["default_backbone"])
    if name not in conf["backbones"]:
        raise OvssError(f"unknown --reward-backbone {name!r}: choose one of "
                        f"{', '.join(conf['backbones'])}")
    return {"backbone": {"name": name, **conf["backbones"][name]},
            "settings": conf.get("settings", {})}
