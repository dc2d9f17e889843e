"""The straight PnP-OVSS pipeline, one configuration at a time: ground truth for the tests and
the naive search of ``bench/pnp.py`` (what the paper's code runs per configuration).

Each pass is the reference code's GradCAM pass (LAVIS ``compute_gradcam``): the image tensor
requires a gradient, the ITM match logit is back-propagated through the whole model (the vision
tower included, down to the pixels), a tensor hook on the chosen layer's cross-attention catches
``∂s/∂A``, and one head is kept. The class maps are word-piece means written as plain loops, and
the dropped patches are filled by a loop with the reference's fill value written out here; the
drop selection (each rule, with its iteration count) and the aggregate ``2 M~^(0) + sum M~^(t)``
with the relative threshold are written out here too (reference code: ``seg.py`` L564-722 at HEAD
e439962; halving: v1 tree 687a4e5 ``…_VOC.py`` L248-271; docs/pnp.md). Nothing here is shared
with the extract/decode path except the prompt and step 5's blur + CRF (``postprocess.py``,
tested on its own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from methods.base import ClassSet
from methods.pnp.postprocess import channels_to_labels, resize_nearest
from methods.pnp.text import Prompt


def single_head_gradcam(seg: Any, pixels: torch.Tensor, prompt: Prompt, layer: int,
                        head: int) -> torch.Tensor:
    """G of one 0-based (layer, head): ``[T, P²]`` float32, by a full backward to the pixels."""
    vlm = seg.vlm
    caught: dict[str, torch.Tensor] = {}

    def on_catch(_li: int, attn: torch.Tensor) -> None:
        caught["attn"] = attn
        attn.register_hook(lambda g: caught.__setitem__("grad", g))

    x = pixels.clone().to(vlm.device).requires_grad_(True)
    ids = prompt.input_ids.to(vlm.device)
    with torch.enable_grad(), vlm.catch_attention([layer], on_catch):
        score = vlm.match_logit(x, ids, torch.ones_like(ids))
        score.sum().backward(inputs=[x])
    a = caught["attn"][0, head, :, 1:].detach().float().cpu()
    g = caught["grad"][0, head, :, 1:].float().cpu()
    out = torch.zeros_like(a)
    for t in range(a.shape[0]):
        out[t] = a[t] * torch.where(g[t] > 0, g[t], torch.zeros_like(g[t]))
    return out


def word_piece_means(gradcam: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[T, N]`` -> ``[K, N]``: per class the mean of its token rows (a loop)."""
    rows = []
    for group in groups:
        acc = torch.zeros(gradcam.shape[1])
        for r in group:
            acc = acc + gradcam[r]
        rows.append(acc / len(group))
    return torch.stack(rows) if rows else torch.zeros(0, gradcam.shape[1])


def class_token_sum(gradcam: torch.Tensor, groups: Sequence[Sequence[int]],
                    dropped: torch.Tensor) -> torch.Tensor:
    """The class-agnostic salience U: every class token row summed, dropped patches at 0."""
    u = torch.zeros(gradcam.shape[1])
    for group in groups:
        for r in group:
            u = u + gradcam[r]
    u[dropped] = 0.0
    return u


def reference_fill(seg: Any) -> torch.Tensor:
    """The normalised value of dropped pixels, ``[3]``, written out from the reference: it zeroes
    the already-normalised tensor (``seg.py`` L595-603), so "mean" is 0, the mean colour; "black"
    is pixel 0 normalised, ``(0 - mean) / std`` per channel."""
    if seg.settings["drop_fill"] == "mean":
        return torch.tensor([0.0, 0.0, 0.0])
    return torch.tensor([(0.0 - m) / d for m, d in zip(seg.vlm.mean, seg.vlm.std)])


def prompt_and_groups(seg: Any, classes: ClassSet, labels: Sequence[int]):
    """The prompt and the token rows of each class of ``labels``: with ``prompt_classes: all``
    the prompt lists every foreground class and the present ones are picked out (the
    reference's search scripts, v1 ``…_search_VOC.py`` L170 and L368)."""
    listed = list(classes.foreground) if seg.settings["prompt_classes"] == "all" else labels
    prompt = seg.prompt(classes, listed)
    groups = []
    for c in labels:
        for k, other in enumerate(listed):
            if other == c:
                groups.append(prompt.groups[k])
    return prompt, groups


def drop_selection(u: torch.Tensor, dropped: set[int], rule: str, iteration: int, k: int,
                   threshold: float) -> set[int]:
    """The patches dropped after the pass of 0-based drop iteration ``iteration``, one patch at a
    time: the still-kept patches ranked by ``u`` (``[N]`` float32), highest first, ties to the
    lower index; ``top_k``: the first k (the reference: ``argsort(U)[-10:]``); ``halving``: the
    first ``N // 2**(iteration + 1)`` (v1: 1152, 576, ... of 2304); ``above``: every kept patch
    whose min-max value over the kept ones is ``>= threshold`` (all of them when U is flat)."""
    n = u.shape[0]
    free = [i for i in range(n) if i not in dropped]
    if not free:
        return set(dropped)
    if rule == "above":
        lo, hi = min(u[i] for i in free), max(u[i] for i in free)
        if not hi > lo:
            return dropped | set(free)
        return dropped | {i for i in free if (u[i] - lo) / (hi - lo) >= threshold}
    count = k if rule == "top_k" else n // 2 ** (iteration + 1)
    ranked = sorted(free, key=lambda i: (-float(u[i]), i))
    return dropped | set(ranked[:count])


def drop_chain(seg: Any, image: np.ndarray, classes: ClassSet, labels: Sequence[int],
               layer: int, head: int, drop_iters: int
               ) -> tuple[list[torch.Tensor], list[set[int]]]:
    """The D masked maps ``M~^(t)`` (``[K, N]`` each) of one 1-based (layer, head), and the set
    of patches dropped before each pass (empty before pass 0)."""
    s = seg.settings
    prompt, groups = prompt_and_groups(seg, classes, labels)
    pixels = seg.preprocess(image)
    n = seg.grid * seg.grid
    dropped: set[int] = set()
    u = torch.zeros(n)
    maps, sets = [], []
    for t in range(drop_iters):
        if t > 0:   # the selection after pass t - 1, from that pass's U
            dropped = drop_selection(u, dropped, s["drop_rule"], t - 1, int(s["drop_k"]),
                                     float(s["drop_threshold"]))
        x = pixels.clone()
        fill = reference_fill(seg)
        q, grid = seg.vlm.patch, seg.grid
        for i in sorted(dropped):
            r, c = divmod(i, grid)
            for ch in range(3):
                x[0, ch, r * q:(r + 1) * q, c * q:(c + 1) * q] = fill[ch]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[sorted(dropped)] = True
        g = single_head_gradcam(seg, x, prompt, layer - 1, head - 1)
        m = word_piece_means(g, groups)
        m[:, mask] = 0.0
        maps.append(m)
        sets.append(set(dropped))
        u = class_token_sum(g, groups, mask)
    return maps, sets


def drop_chain_maps(seg: Any, image: np.ndarray, classes: ClassSet, labels: Sequence[int],
                    layer: int, head: int, drop_iters: int) -> list[torch.Tensor]:
    """The D masked maps ``M~^(t)`` (``[K, N]`` each) of one 1-based (layer, head)."""
    return drop_chain(seg, image, classes, labels, layer, head, drop_iters)[0]


def aggregate_and_threshold(maps: Sequence[torch.Tensor], first_weight: float,
                            threshold: float) -> torch.Tensor:
    """``M^ = w0 M~^(0) + M~^(1) + ...`` (the reference: the list starts as a copy of M~^(0),
    ``seg.py`` L716-721), then per class ``B = M^ . 1[(M^ - min) / (max - min) >= T]`` (L425-433;
    a flat map keeps nothing). ``[K, N]`` each -> ``[K, N]``."""
    agg = first_weight * maps[0]
    for m in maps[1:]:
        agg = agg + m
    out = torch.zeros_like(agg)
    for c in range(agg.shape[0]):
        lo, hi = agg[c].min(), agg[c].max()
        if hi > lo:
            keep = (agg[c] - lo) / (hi - lo) >= threshold
            out[c] = torch.where(keep, agg[c], torch.zeros_like(agg[c]))
    return out


def naive_segment(seg: Any, image: np.ndarray, classes: ClassSet, params: Mapping[str, Any],
                  present: Sequence[int] | None = None) -> np.ndarray:
    """The whole pipeline for one configuration: HxW int64 label map (no evidence, no cache)."""
    labels = seg.present_classes(image, classes, present)
    size = seg.work_size(*image.shape[:2])
    p = seg.grid
    if labels:
        maps = drop_chain_maps(seg, image, classes, labels, int(params["layer"]),
                               int(params["head"]), int(params["drop_iters"]))
        b = aggregate_and_threshold(maps, float(seg.settings["first_weight"]),
                                    float(params["threshold"]))
    else:
        b = torch.zeros(0, p * p)
    b = b.view(-1, p, p)
    rgb = image if size == image.shape[:2] else np.asarray(
        Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    idx = channels_to_labels(b, size, classes.background, float(params["sigma"]),
                             bool(params["crf"]), rgb, seg.settings)
    lut = np.asarray(([0] if classes.background else []) + list(labels) or [0], np.int64)
    return resize_nearest(lut[idx], tuple(image.shape[:2]))
