"""The straight PnP-OVSS pipeline, one configuration at a time: ground truth for the tests and
the naive search of ``bench/pnp.py`` (what the paper's code runs per configuration).

Each pass is the reference code's GradCAM pass (LAVIS ``compute_gradcam``): the image tensor
requires a gradient, the ITM match logit is back-propagated through the whole model (the vision
tower included, down to the pixels), a tensor hook on the chosen layer's cross-attention catches
``∂s/∂A``, and one head is kept. The class maps are word-piece means written as plain loops, and
the dropped patches are filled by a loop with the reference's fill value written out here.
Nothing here is shared with the extract/decode path except the step-4/5 formulas (tested
against their own transcriptions) and the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from methods.base import ClassSet
from methods.pnp.formulas import (
    dropout_aggregate,
    relative_threshold,
    salience_dropout_selection,
)
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


def drop_chain_maps(seg: Any, image: np.ndarray, classes: ClassSet, labels: Sequence[int],
                    layer: int, head: int, drop_iters: int) -> list[torch.Tensor]:
    """The D masked maps ``M~^(t)`` (``[K, N]`` each) of one 1-based (layer, head)."""
    s = seg.settings
    prompt, groups = prompt_and_groups(seg, classes, labels)
    pixels = seg.preprocess(image)
    n = seg.grid * seg.grid
    dropped = torch.zeros(n, dtype=torch.bool)
    u = torch.zeros(n)
    maps = []
    for t in range(drop_iters):
        if t > 0:
            dropped = salience_dropout_selection(u, dropped, s["drop_rule"], t - 1,
                                                 int(s["drop_k"]), float(s["drop_threshold"]))
        x = pixels.clone()
        fill = reference_fill(seg)
        q, grid = seg.vlm.patch, seg.grid
        for i in range(n):
            if dropped[i]:
                r, c = divmod(i, grid)
                for ch in range(3):
                    x[0, ch, r * q:(r + 1) * q, c * q:(c + 1) * q] = fill[ch]
        g = single_head_gradcam(seg, x, prompt, layer - 1, head - 1)
        m = word_piece_means(g, groups)
        m[:, dropped] = 0.0
        maps.append(m)
        u = class_token_sum(g, groups, dropped)
    return maps


def naive_segment(seg: Any, image: np.ndarray, classes: ClassSet, params: Mapping[str, Any],
                  present: Sequence[int] | None = None) -> np.ndarray:
    """The whole pipeline for one configuration: HxW int64 label map (no evidence, no cache)."""
    labels = seg.present_classes(image, classes, present)
    size = seg.work_size(*image.shape[:2])
    p = seg.grid
    if labels:
        maps = drop_chain_maps(seg, image, classes, labels, int(params["layer"]),
                               int(params["head"]), int(params["drop_iters"]))
        agg = dropout_aggregate(torch.stack(maps), float(seg.settings["first_weight"]))
    else:
        agg = torch.zeros(0, p * p)
    b = relative_threshold(agg, float(params["threshold"])).view(-1, p, p)
    rgb = image if size == image.shape[:2] else np.asarray(
        Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    idx = channels_to_labels(b, size, classes.background, float(params["sigma"]),
                             bool(params["crf"]), rgb, seg.settings)
    lut = np.asarray(([0] if classes.background else []) + list(labels) or [0], np.int64)
    return resize_nearest(lut[idx], tuple(image.shape[:2]))
