"""Score one config on a set of images with the standard protocol: extract (Ray tasks, through
the search's evidence cache), decode and score (Ray tasks over chunks of images whose confusion
matrices are summed in the driver).

The confusion-matrix mIoU of ``rewards.miou`` (mmsegmentation's protocol, 255 ignored) over every
image. Used by ``search.evaluate``, ``search.transfer`` and a search's held-out images.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from methods.base import OvssError
from search.core.errors import user_error


@dataclass
class EvalData:
    """The images to score: ``items`` index the data set opened with ``data_kwargs``."""

    dataset: str
    data_kwargs: dict[str, Any]
    classes: Any                     # methods.base.ClassSet of the test data set
    items: list = field(default_factory=list)   # search.core.trial.ImageItem

    def describe(self) -> str:
        ids = [it.image_id for it in self.items]
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        return f"{self.dataset} {self.data_kwargs['split']}: {shown}"


def image_items(data, indices: Sequence[int]) -> list:
    """One :class:`search.core.trial.ImageItem` per index, reading each image and label map once so
    a corrupt file or a label map of the wrong size stops before Ray starts."""
    from search.core.trial import read_item

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
    """A :class:`search.core.trial.SearchContext` for scoring ``config`` on ``data``; its cache keys
    are those of a search of the same backbone, settings and classes, so evidence is shared."""
    from methods import get_segmenter_class
    from search.core.trial import SearchContext, settings_key
    from search.engine.configs import dataset_settings

    seg_cls = get_segmenter_class(config["method"])
    ctx = SearchContext(
        method=config["method"], backbone=dict(config["backbone"]),
        settings=dataset_settings(config, data.dataset), defaults=dict(config["params"]),
        classes=data.classes.to_dict(), dataset=dict(data.data_kwargs), items=list(data.items),
        rungs=[len(data.items)], reward={"name": "miou"}, cache_dir=str(cache_dir),
        extraction_knobs=tuple(seg_cls.extraction_knobs), device=device)
    ctx.settings_key = settings_key(ctx)
    return ctx


def _score_chunk(ctx, params: dict, items: list, n_overlays: int):
    """Ray task: decode ``items`` with ``params``; returns (confusion matrix, overlays)."""
    from rewards.miou import ConfusionMatrix
    from search.core.trial import check_prediction, evidence_for, get_dataset, get_segmenter

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
    from search.engine.extract import extraction_pass

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
                user = user_error(e)
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
