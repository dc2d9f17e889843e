"""The knob side of FSeg-LLaVA: TVR maps -> D_f -> VGM -> SAM prompts -> one label map.

Shared by ``decode`` (maps from the cached evidence, SAM on the cached embedding) and by the
straight pipeline of ``reference.py`` (maps from full forwards, SAM after ``set_image``).

Layer numbering (knobs ``l_s``, ``l_span``, ``layer_base``): the range is l_s..l_e with
l_e = l_s + l_span, so every sampled pair is valid (l_s > l_e cannot happen; a range past the
last layer raises OvssError). With ``layer_base: 1`` (default) "layer l" is the output of
decoder block l (1-based: hidden_states[l], attentions[l - 1]), the paper's Fig. 1 reading;
``layer_base: 0`` counts blocks from 0 (hidden_states[l + 1], attentions[l]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from methods.base import OvssError
from methods.fseg import formulas as fm
from methods.fseg.prompts import MERGES, merge_masks, sam_prompts, upsample_to_image

CHOICES: dict[str, tuple[Any, ...]] = {
    "pool": ("mean", "first", "last"),
    "attn_layers": ("all", "range"),
    "entropy": fm.ENTROPY_VARIANTS,
    "fusion": ("product", "distance"),
    "refine": ("product", "guidance"),
    "upsample": ("bilinear_then_argmax", "argmax_then_nearest"),
    "morph": ("open_close", "close_open"),
    "prompt": ("points", "box", "both"),
    "empty": ("raw", "drop"),
    "merge": MERGES,
    "layer_base": (0, 1),
    "image_mass": ("chord", "none"),
}
#: SAM on one class's prompts: (points P x 2 or None, box [4] or None) -> (H x W bool, IoU).
SamFn = Callable[[np.ndarray | None, np.ndarray | None], tuple[np.ndarray, float]]


@dataclass
class Geometry:
    image_size: tuple[int, int]          # H, W of the original image
    grid: tuple[int, int]                # gh, gw of the token grid
    view: tuple[int, int, int, int]      # y0, x0, bh, bw: the image box the grid covers


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (0: leave the setting alone). Decode is
    small-tensor code: on a busy 2-core machine one thread was 15x faster than two."""
    old = torch.get_num_threads()
    if n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0 and n != old:
            torch.set_num_threads(old)


def check_params(params: Mapping[str, Any], layers: int) -> tuple[list[int], list[int]]:
    """Validate the knobs; returns (hidden-state indices, attention indices) of l_s..l_e."""
    for k, choices in CHOICES.items():
        if params[k] not in choices:
            raise OvssError(f"fseg: {k} must be one of {list(choices)}, got {params[k]!r}")
    base, ls, span = int(params["layer_base"]), int(params["l_s"]), int(params["l_span"])
    le = ls + span
    if span < 0:
        raise OvssError(f"fseg: l_span must be >= 0 (l_e = l_s + l_span), got {span}")
    if ls < base or le > layers - 1 + base:
        raise OvssError(f"fseg: layers l_s={ls}..l_e={le} are outside {base}..{layers - 1 + base}"
                        f" (the LLM has {layers} blocks, layer_base={base})")
    for k in ("kernel_tokens", "min_area_tokens"):
        if float(params[k]) < 0:
            raise OvssError(f"fseg: {k} must be >= 0 (token units), got {params[k]}")
    if int(params["skip_layers"]) < 0:
        raise OvssError(f"fseg: skip_layers must be >= 0, got {params['skip_layers']}")
    if int(params["K"]) < 1:
        raise OvssError(f"fseg: K must be >= 1, got {params['K']}")
    layers_l = range(ls, le + 1)
    return [layer + 1 - base for layer in layers_l], [layer - base for layer in layers_l]


def attention_mask(maps: torch.Tensor, entropy: torch.Tensor, attn_idx: Sequence[int],
                   params: Mapping[str, Any], grid: tuple[int, int]) -> torch.Tensor | None:
    """M_A of one class from its L x H x N maps and L x H entropies (the chosen variant); None
    when no candidate map is left (the attention path then passes everything)."""
    layers = torch.arange(maps.shape[0])
    if params["attn_layers"] == "range":
        layers = layers[list(attn_idx)]
        maps, entropy = maps[layers], entropy[layers]
    flat = maps.reshape(-1, maps.shape[-1]).float()
    layer_of = layers.repeat_interleave(maps.shape[1])
    keep = head_filter(flat, layer_of, params, grid)
    av = fm.a_v(flat, entropy.reshape(-1), int(params["K"]), keep)
    return None if av is None else fm.m_a(av)


def head_filter(maps: torch.Tensor, layer_of: torch.Tensor, params: Mapping[str, Any],
                grid: tuple[int, int]) -> torch.Tensor:
    """The candidate-head guard (``sink_row``, ``image_mass``, ``skip_layers``) of M maps
    (M x N) whose 0-based blocks are ``layer_of`` (M) -> M bool."""
    return fm.candidate_heads(maps, layer_of, grid, float(params["sink_row"]),
                              params["image_mass"], int(params["skip_layers"]))


def fused_response(d_tilde_maps: torch.Tensor, masks: Sequence[torch.Tensor | None],
                   params: Mapping[str, Any]) -> torch.Tensor:
    """D_f for every yes-class: D~ (Y x N) -> tau -> D -> D . M_A (Y x N float32)."""
    alpha, beta = float(params["alpha"]), float(params["beta"])
    d = fm.d_thresholded(d_tilde_maps, fm.tau(d_tilde_maps, alpha, beta))
    if params["fusion"] == "distance":
        return d
    return torch.stack([d[j] if m is None else fm.d_f(d[j], m) for j, m in enumerate(masks)])


def token_size(geo: Geometry) -> tuple[float, float]:
    """(height, width) in image pixels of one grid token: the view box over the grid."""
    return geo.view[2] / geo.grid[0], geo.view[3] / geo.grid[1]


def denoise_sizes(geo: Geometry, params: Mapping[str, Any]) -> tuple[int, float]:
    """De-noising sizes in token units -> pixels: (square kernel side in px, rounded, from
    ``kernel_tokens`` x the token's shorter side; min component area as a fraction of the
    image, from ``min_area_tokens`` x the token's area). One LLaVA-1.5 token of a 500 x 375
    VOC image (padded to 500) is 20.8 px, 0.23 % of the image."""
    th, tw = token_size(geo)
    h, w = geo.image_size
    kernel = int(round(float(params["kernel_tokens"]) * min(th, tw)))
    return kernel, float(params["min_area_tokens"]) * th * tw / (h * w)


def label_map(d_f_maps: torch.Tensor, d_tilde_maps: torch.Tensor, fv: torch.Tensor,
              labels: Sequence[int], background: bool, geo: Geometry,
              params: Mapping[str, Any], sam: SamFn) -> np.ndarray:
    """VGM (M^_f, p+/p-, M_v, M_r), SAM prompts, SAM, merge. d_f_maps / d_tilde_maps: Y x N,
    fv: N x Dv, labels: the yes-classes' label values -> H x W int64."""
    h, w = geo.image_size
    gh, gw = geo.grid
    alpha, beta = float(params["alpha"]), float(params["beta"])
    bg = fm.d_f_bg(d_f_maps, alpha, beta)
    guide = fm.guidance_map(d_f_maps, bg)
    planes = torch.cat([bg.expand(1, gh * gw), d_f_maps], 0).reshape(-1, gh, gw)
    planes_img = upsample_to_image(planes, geo.view, (h, w), "bilinear")
    guide_img = fm.argmax0(planes_img)
    kernel_px, min_area = denoise_sizes(geo, params)
    masks, priority, mask_labels = [], [], []
    for j, label in enumerate(labels):
        p_pos, p_neg = fm.prototypes(fv, guide, j + 1)
        if p_pos is None:
            continue
        mv = fm.m_v(fv, p_pos, p_neg)
        if params["refine"] == "guidance":
            mv = torch.ones_like(mv)
        if params["upsample"] == "bilinear_then_argmax":
            mv_img = upsample_to_image(mv.float().reshape(1, gh, gw), geo.view, (h, w),
                                       "nearest")[0] > 0.5
            mr_img = fm.m_r(mv_img, guide_img, j + 1)
        else:
            mr = fm.m_r(mv, guide, j + 1).float().reshape(1, gh, gw)
            mr_img = upsample_to_image(mr, geo.view, (h, w), "nearest")[0] > 0.5
        prompts = sam_prompts(mr_img.numpy(), kernel_px, params["morph"],
                              min_area, int(params["max_points"]),
                              bool(params["snap_centroid"]), params["empty"])
        if prompts is None:
            continue
        mode = params["prompt"]
        mask, score = sam(prompts.points if mode in ("points", "both") else None,
                          prompts.box if mode in ("box", "both") else None)
        masks.append(mask)
        mask_labels.append(label)
        priority.append(_priority(params["merge"], mask, score, label, planes_img[j + 1]))
    if background:
        fill = np.zeros((h, w), dtype=np.int64)
    else:  # no background class: uncovered pixels take the yes-class of highest D~
        dt = upsample_to_image(d_tilde_maps.reshape(-1, gh, gw), geo.view, (h, w), "bilinear")
        fill = np.asarray(labels, dtype=np.int64)[fm.argmax0(dt).numpy()]
    return merge_masks(masks, priority, mask_labels, fill)


def _priority(rule: str, mask: np.ndarray, score: float, label: int,
              plane: torch.Tensor) -> float:
    """Overlap rule: activation = mean upsampled D_f^c inside the mask; score = SAM's IoU
    prediction; area_asc = smaller masks win; order = lower label values win."""
    if rule == "activation":
        return float(plane[torch.from_numpy(mask)].mean()) if mask.any() else -np.inf
    if rule == "score":
        return score
    if rule == "area_asc":
        return -float(mask.sum())
    return -float(label)
