"""Mask overlays of a config on a few images (image | overlay | label colours), as MLflow
artifacts: the best config of a search (decoded in the driver when the method's decode head is
cached, else in a Ray task) and a scored config (:mod:`search.engine.scoring` hands its label
maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Tuning images whose best-config overlays the parent run gets.
OVERLAY_IMAGES = 3


def overlay_preds(ctx, params, n: int, seg=None):
    """Best-config label maps + images of the first ``n`` tuning images: in a Ray task (the
    driver never loads a model), or in the driver with ``seg``, a segmenter that decodes
    without its model (:func:`driver_segmenter`)."""
    from search.core.trial import evidence_for, get_dataset, get_segmenter

    seg = seg if seg is not None else get_segmenter(ctx)
    data = get_dataset(ctx, labels="image" if ctx.reward["name"] == "clip" and not ctx.fidelity
                       else "dense")
    out = []
    for item in ctx.items[:n]:
        pred = np.asarray(seg.decode(evidence_for(ctx, item, params), params))
        out.append((item.image_id, data.image(item.index), pred))
    return out


def driver_segmenter(ctx, n: int = OVERLAY_IMAGES):
    """A segmenter the driver can decode the first ``n`` tuning images with, without building
    a model: the cached decode head's (:func:`search.core.trial.head_segmenter`), the images'
    evidence cached and no knob-dependent extension. None otherwise (a Ray task decodes)."""
    from search.core.trial import get_cache, head_segmenter

    if ctx.extraction_knobs:
        return None
    cache = get_cache(ctx)
    if not all(cache.has(ctx.method, ctx.base_key(item)) for item in ctx.items[:n]):
        return None
    return head_segmenter(ctx, "cpu")


def start_overlays(ctx, params, out: Path, seg=None, n: int = OVERLAY_IMAGES,
                   gpus: float = 0.0):
    """Starts the overlays and returns a function that waits for them and returns the PNGs
    (image | overlay | label colours) written into ``out``. Decoded in the driver with ``seg``
    (from :func:`driver_segmenter`: no worker to start, no model to load) on a thread, else in
    a Ray task; either runs while the driver makes the plots."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    if seg is None:
        task = ray.remote(overlay_preds).options(num_gpus=gpus, max_retries=0)
        ref = task.remote(ctx, params, n)
        return lambda: write_overlays(out, ray.get(ref))
    # torch and zlib release the GIL: the plots go on meanwhile; result() re-raises a failure
    pool = ThreadPoolExecutor(1, thread_name_prefix="ovss-overlays")
    future = pool.submit(lambda: write_overlays(out, overlay_preds(ctx, params, n, seg)))
    pool.shutdown(wait=False)
    return future.result


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
