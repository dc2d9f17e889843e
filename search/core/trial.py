"""One trial: evidence in, params in, a score out (Ray and MLflow stay outside).

:class:`SearchContext` is the picklable description of a search that Ray ships to every worker;
the worker builds the segmenter, the cache, the data set and the scorer once per process
(:func:`_memo`) and reuses them across trials.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from methods import get_segmenter_class
from methods.base import ClassSet, Evidence, OvssError, Segmenter
from search.core.cache import EvidenceCache, evidence_key

PRESENCE_SOURCES = ("model", "image_labels", "ground_truth")


class TrialScoreError(RuntimeError):
    """A trial's score is not a finite number (NaN or inf)."""


@dataclass(frozen=True)
class ImageItem:
    index: int          # index in the data set
    image_id: str
    image_hash: str     # sha256 of the image file bytes
    present: tuple[int, ...]  # image-level labels (label values)


def read_item(data, i: int, dense: bool) -> ImageItem:
    """Image ``i`` of a data set as an :class:`ImageItem`, reading the image (and, ``dense``, its
    label map) once, so a corrupt file or a label map of the wrong size is a one-line error
    before any Ray work."""
    from search.core.cache import file_hash

    image = data.image(i)
    if dense:
        label = data.label(i)
        if label.shape != image.shape[:2]:
            raise OvssError(f"label map of image {data.ids()[i]!r} has size "
                            f"{label.shape[1]}x{label.shape[0]}, the image "
                            f"{image.shape[1]}x{image.shape[0]}")
    present = tuple(int(c) for c in data.image_labels(i))
    return ImageItem(i, str(data.ids()[i]), file_hash(data.image_path(i)), present)


@dataclass
class SearchContext:
    method: str
    backbone: dict[str, Any]
    settings: dict[str, Any]
    defaults: dict[str, Any]
    classes: dict[str, Any]
    dataset: dict[str, Any]          # kwargs of search.data.open_dataset
    items: list[ImageItem]
    rungs: list[int]                 # cumulative number of images scored after each rung
    reward: dict[str, Any]           # {"name": "miou"|"clip", ...}
    cache_dir: str
    settings_key: dict[str, Any] = field(default_factory=dict)
    extraction_knobs: tuple[str, ...] = ()
    fidelity: bool = False
    device: str = "cpu"
    extract_nodes: list[str] = field(default_factory=list)   # Ray node ids that extracted
    # Ray node id -> the one line saying its extraction ran on CPU although Ray assigned a GPU
    # (search.core.devices.worker_device)
    device_notes: dict[str, str] = field(default_factory=dict)
    # Where extract's present classes come from (settings.presence_source): "model" (None: the
    # method finds them itself, as at inference), "image_labels" or "ground_truth" (the
    # image-level labels; ground truth is an oracle, used only when asked for by name).
    presence_source: str = "model"
    # Seconds per image of ``extract`` on the extraction device (:func:`extraction_cost`, set by
    # the engine's cost probe) when the search measures cost; None: it does not.
    cost_extract: dict[str, Any] | None = None

    def extract_present(self, item: ImageItem) -> list[int] | None:
        """The ``present`` argument of extract/extend for ``item``."""
        return None if self.presence_source == "model" else list(item.present)

    @property
    def class_set(self) -> ClassSet:
        return ClassSet.from_dict(self.classes)

    def base_key(self, item: ImageItem) -> str:
        # The image-level labels are an input of extract (PnP's prompt lists the present classes).
        return evidence_key(item.image_hash, self.method, self.settings_key,
                            {"present": self.extract_present(item)})

    def extension_key(self, item: ImageItem, knobs: Mapping[str, Any]) -> str:
        return evidence_key(item.image_hash, self.method, self.settings_key,
                            {"present": self.extract_present(item), **knobs})



def settings_key(ctx: SearchContext) -> dict:
    """Every input of extract besides the image: the backbone spec, settings and classes, with
    the identity of the weights they name (hub commit, or a local checkpoint's size, mtime and
    sha256). ``ctx.settings_key`` is set to it, so a search, an evaluation and a re-ranking of
    the same backbone, settings and classes share evidence."""
    from search.core.cache import weights_identity

    return {"backbone": ctx.backbone, "settings": ctx.settings, "classes": ctx.classes,
            "weights": weights_identity(ctx.backbone),
            "settings_weights": weights_identity(ctx.settings)}

_MEMO: dict[str, Any] = {}


def _memo(kind: str, spec: Any, build: Callable[[], Any]) -> Any:
    key = kind + json.dumps(spec, sort_keys=True, default=str)
    if key not in _MEMO:
        _MEMO[key] = build()
    return _MEMO[key]


def on_worker_device(ctx: SearchContext) -> SearchContext:
    """``ctx`` on the device this worker can use: a ``cuda`` that Ray assigned but torch cannot
    see falls back to ``cpu`` (search.core.devices.worker_device)."""
    from dataclasses import replace

    from search.core.devices import worker_device

    device = worker_device(ctx.device).device
    return ctx if device == ctx.device else replace(ctx, device=device)


def get_segmenter(ctx: SearchContext) -> Segmenter:
    ctx = on_worker_device(ctx)
    return _memo("seg", [ctx.method, ctx.backbone, ctx.settings, ctx.device],
                 lambda: build_segmenter(ctx))


def decode_state_key(ctx: SearchContext) -> str:
    """Cache key of the decode head of ``ctx``'s segmenter (its weights are in settings_key)."""
    return evidence_key("decode-head", ctx.method, ctx.settings_key,
                        {"backbone": ctx.backbone, "settings": ctx.settings})


def head_segmenter(ctx: SearchContext, device: str | None = None) -> Segmenter | None:
    """The segmenter built from the decode head an earlier full build cached (a method with
    ``decode_state`` / ``from_decode_state``, e.g. clipseg): it decodes without the model.
    None when the method has no head, or the head is missing, damaged or malformed."""
    from_state = getattr(get_segmenter_class(ctx.method), "from_decode_state", None)
    if from_state is None:
        return None
    state = get_cache(ctx).get(ctx.method, decode_state_key(ctx))
    if state is None:
        return None
    try:
        return from_state(ctx.backbone, ctx.settings, state, device or ctx.device)
    except OvssError:
        return None         # the full build names what is wrong, or decodes right


def build_segmenter(ctx: SearchContext) -> Segmenter:
    """The cached decode head's segmenter (:func:`head_segmenter`), so that a trial worker
    decoding cached evidence never builds the model; else ``from_spec``, whose head (if the
    method has one) is cached for the next worker."""
    seg = head_segmenter(ctx)
    if seg is not None:
        return seg
    cls = get_segmenter_class(ctx.method)
    seg = cls.from_spec(ctx.backbone, ctx.settings, ctx.device)
    if getattr(cls, "from_decode_state", None) is not None:
        try:
            get_cache(ctx).put(ctx.method, decode_state_key(ctx), seg.decode_state())
        except OvssError:
            pass            # a read-only cache: each worker builds the model, as before
    return seg


def get_dataset(ctx: SearchContext, labels: str | None = None):
    from search.data import open_dataset

    kw = dict(ctx.dataset)
    if labels is not None:
        kw["labels"] = labels
    return _memo("data", kw, lambda: open_dataset(**kw))


def get_cache(ctx: SearchContext) -> EvidenceCache:
    return _memo("cache", ctx.cache_dir, lambda: EvidenceCache(ctx.cache_dir))


def extract_item(ctx: SearchContext, item: ImageItem) -> bool:
    """Fill the cache with the knob-independent evidence of one image. True if it was computed."""
    cache = get_cache(ctx)
    key = ctx.base_key(item)
    if cache.has(ctx.method, key):
        return False
    seg = get_segmenter(ctx)
    image = get_dataset(ctx).image(item.index)
    ev = seg.extract(image, ctx.class_set, ctx.extract_present(item))
    cache.put(ctx.method, key, ev)
    return True


def evidence_for(ctx: SearchContext, item: ImageItem, params: Mapping[str, Any]) -> Evidence:
    """Base evidence (+ the knob-dependent extension, computed and cached on a miss)."""
    cache = get_cache(ctx)
    ev = cache.get(ctx.method, ctx.base_key(item))
    if ev is None:  # evicted or never extracted (e.g. a cache on a node-local disk)
        extract_item(ctx, item)
        ev = cache.get(ctx.method, ctx.base_key(item))
    if not ctx.extraction_knobs:
        return ev
    knobs = {k: params[k] for k in ctx.extraction_knobs}
    if not getattr(get_segmenter_class(ctx.method), "needs_extension", lambda _k: True)(knobs):
        return ev                   # e.g. PnP with D = 1: no image read, no empty cache entry
    xkey = ctx.extension_key(item, knobs)
    extra = cache.get(ctx.method, xkey)
    if extra is None:
        seg = get_segmenter(ctx)
        image = get_dataset(ctx).image(item.index)
        extra = seg.extend(ev, image, ctx.class_set, ctx.extract_present(item), knobs)
        cache.put(ctx.method, xkey, extra)
    return ev.merged(extra)


def make_scorer(ctx: SearchContext, name: str | None = None):
    """An accumulator factory for the reward ``name`` (default: the search's reward)."""
    name = name or ctx.reward["name"]
    classes = ctx.class_set
    if name == "miou":
        from rewards.miou import MiouAccumulator

        ignore = int(ctx.dataset.get("ignore_index", 255))
        names = list(classes.names)

        return lambda: MiouAccumulator(len(names), ignore, class_names=names)
    if name == "clip":
        from rewards.clip_contrastive import ClipContrastiveReward

        ctx = on_worker_device(ctx)
        r = ctx.reward
        reward = _memo("reward", [r, ctx.classes, ctx.device],
                       lambda: ClipContrastiveReward.from_spec(r["backbone"], r.get("settings", {}),
                                                               classes, ctx.device))
        return reward.new
    raise OvssError(f"unknown reward {name!r}: choose miou or clip")


def check_prediction(pred: np.ndarray, image_shape: Sequence[int], n_classes: int,
                     what: str) -> np.ndarray:
    if pred.shape != tuple(image_shape[:2]):
        raise OvssError(f"{what}: decode returned a label map of size {pred.shape}, "
                        f"expected the image size {tuple(image_shape[:2])}")
    return pred


def evaluate(ctx: SearchContext, params: Mapping[str, Any],
             report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Decode every tuning image with ``params`` and report the score after each rung."""
    from search.core.space import full_params

    seg = get_segmenter(ctx)
    knobs = full_params(ctx.defaults, params)
    dense = ctx.reward["name"] == "miou" or ctx.fidelity
    data = get_dataset(ctx, labels="dense" if dense else "image")
    acc = make_scorer(ctx)()
    fid = make_scorer(ctx, "miou")() if ctx.fidelity and ctx.reward["name"] != "miou" else None
    needs_image = ctx.reward["name"] == "clip"
    done, result = 0, {}
    clock = {"evidence": 0.0, "decode": 0.0, "score": 0.0}   # seconds, this trial so far
    decodes: list[float] = []        # seconds of each decode call (the cost's decode part)
    extend = None                    # the extension's cost, measured at the first rung
    for rung, upto in enumerate(ctx.rungs):
        for item in ctx.items[done:upto]:
            t0 = time.perf_counter()
            ev = evidence_for(ctx, item, knobs)
            t1 = time.perf_counter()
            pred = np.asarray(seg.decode(ev, knobs))
            t2 = time.perf_counter()
            label = data.label(item.index) if dense else None
            image = data.image(item.index) if needs_image else None
            if label is not None:
                check_prediction(pred, label.shape, len(ctx.class_set.names), item.image_id)
            acc.update(image, pred, label=label, present=list(item.present))
            if fid is not None:
                fid.update(None, pred, label=label, present=list(item.present))
            t3 = time.perf_counter()
            clock["evidence"] += t1 - t0
            clock["decode"] += t2 - t1
            decodes.append(t2 - t1)
            clock["score"] += t3 - t2
        done = upto
        score = float(acc.value())
        if not math.isfinite(score):
            # Fails the trial (FAILED in Tune and MLflow, ignored by the best config) rather than
            # handing the searcher a number it cannot compare.
            raise TrialScoreError(f"{ctx.reward['name']} score is {score} after {upto} images")
        result = {"score": score, "rung": rung, "images": upto,
                  "rungs_total": len(ctx.rungs),
                  **{f"time/{k}_s": v for k, v in clock.items()},
                  "worker/max_rss_mb": _max_rss_mb()}
        if fid is not None:
            result["fidelity_miou"] = float(fid.value())
        if ctx.cost_extract is not None:
            if extend is None:
                extend = extension_cost(ctx, seg, knobs)
            result.update(cost_metrics(ctx.cost_extract["seconds"], extend["seconds"],
                                       decodes))
        if rung == len(ctx.rungs) - 1:
            result.update({k: float(v) for k, v in acc.details().items()})
        report(result)
    return result


def probe_items(ctx: SearchContext) -> list[ImageItem]:
    """The tuning images a cost measurement times (``conf/cost.yaml: probe.images``)."""
    from search.core.cost import cost_conf

    return ctx.items[:int(cost_conf()["probe"]["images"])]


def _probe(ctx: SearchContext, stage: str, knobs: Mapping[str, Any],
           make_call: Callable[[ImageItem, np.ndarray], Callable[[], Any]]) -> dict[str, Any]:
    """The cached (:func:`search.core.cost.measured`) seconds per image of the calls
    ``make_call(item, image)`` returns (made untimed: image reads, cached evidence), on this
    worker's device, over :func:`probe_items`."""
    from search.core.cost import cost_conf, cost_key, device_kind, measured, time_calls

    ctx = on_worker_device(ctx)      # a GPU torch cannot use: the worker times the CPU
    items = probe_items(ctx)
    kind = device_kind(ctx.device)
    key = cost_key(stage, ctx.method, ctx.settings_key,
                   {"presence_source": ctx.presence_source, **knobs}, kind,
                   [it.image_hash for it in items])

    def measure() -> list[float]:
        data = get_dataset(ctx)
        calls = [make_call(it, data.image(it.index)) for it in items]
        return time_calls(calls, ctx.device, int(cost_conf()["probe"]["warmup"]))

    return measured(ctx.cache_dir, key, measure, kind)


def extraction_cost(ctx: SearchContext) -> dict[str, Any]:
    """Seconds per image of the method's ``extract`` on ``ctx.device`` (run where extraction
    runs): ``{"seconds", "samples", "device_kind", "cached"}``."""
    seg = get_segmenter(ctx)
    classes = ctx.class_set
    return _probe(ctx, "extract", {}, lambda it, image: lambda: seg.extract(
        image, classes, ctx.extract_present(it)))


def extension_cost(ctx: SearchContext, seg: Segmenter, knobs: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Seconds per image of ``extend`` for these extraction knobs on ``ctx.device`` (0 for a
    method without extraction knobs). ``Segmenter.segment`` calls ``extend`` whenever the
    method has extraction knobs, so it is timed even where the search skips it."""
    if not ctx.extraction_knobs:
        return {"seconds": 0.0}
    sub = {k: knobs[k] for k in ctx.extraction_knobs}
    classes = ctx.class_set

    def make_call(item: ImageItem, image: np.ndarray) -> Callable[[], Any]:
        ev = get_cache(ctx).get(ctx.method, ctx.base_key(item))
        if ev is None:
            extract_item(ctx, item)
            ev = get_cache(ctx).get(ctx.method, ctx.base_key(item))
        return lambda: seg.extend(ev, image, classes, ctx.extract_present(item), sub)

    return _probe(ctx, "extend", sub, make_call)


def cost_metrics(extract_s: float, extend_s: float, decodes: Sequence[float]
                 ) -> dict[str, float]:
    """A trial's ``cost/*`` results: the parts and their sum, seconds per image (decode: the
    median of its decode calls so far)."""
    from search.core.cost import median
    from search.core.front import COST_METRIC

    decode_s = median(decodes)
    return {"cost/extract_s": float(extract_s), "cost/extend_s": float(extend_s),
            "cost/decode_s": decode_s, COST_METRIC: float(extract_s) + float(extend_s) + decode_s}


def _max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
