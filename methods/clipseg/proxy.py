"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last block reduced to an attention whose map comes
from a second vision model (mc-lan/ProxyCLIP ``open_clip/transformer.py`` 503-587).

Per window: blocks 1..L-1 of CLIP run as they are; of block L only the value projection of
``ln_1(x_{L-1})`` is kept (patch tokens), resized bilinearly from CLIP's patch grid to the
vision model's (:func:`resize_to_cells`). F, the vision model's patch features, L2-normalised
per token, give S = F F^T (:func:`proxy_similarity`); A = softmax(gamma (S - beta mean S)) with
every entry below zero masked, one map for all heads (:func:`proxy_attention`); the block's
output is out_proj(A V). Logits are the cosines of ln_post / proj of it with the names, on the
vision model's grid; the windows are averaged as the family does.

Extract once: A is row-stochastic and shared by the heads, and bilinear resizing is linear with
rows summing to 1, so out_proj(A up(V)) = A up(U) with U = out_proj(V) (bias included). The
evidence holds U (``proxy.values``, W x P_clip x D) and each vision model's S, the cosines of its
features, as a packed upper triangle (``proxy.sim.<name>``, W x P_v (P_v + 1) / 2: no knob
touches S, and F F^T would cost decode P_v^2 C per window), or F itself when that is much
smaller (``proxy.feat.<name>``: SAM's 4096 tokens of 256 channels), plus the window upsampling
for each vision model's grid. beta, gamma, the logit scale, the background threshold and the
vision model are decode knobs.

The all-masked row. When beta mean S >= 1 every entry of a row is below zero (the diagonal is
1 at most), the official softmax over a row of -inf returns NaN, and so does every logit after
it. Here such a row keeps its largest entries (itself, S_ii = 1, and exact ties): the limit of
the official map as beta mean S rises to the row's maximum. Rows with a kept entry are exactly
the official ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from methods.base import OvssError
from methods.clipseg.labels import upsample
from methods.clipseg.packing import unpack_symmetric
from methods.clipseg.vfm import VisionModel, imagenet_pixels
from methods.clipseg.vit import embed_windows, finish_block, split_qkv
from methods.clipseg.windows import WindowGrid, linear_resize_matrix, mosaic, separable_upsampling

VARIANTS = ("proxyclip", "trident")


def proxy_similarity(feats: torch.Tensor) -> torch.Tensor:
    """S: cosines of the vision model's patch features. feats: B x P x C (any norm) -> B x P x P
    float32."""
    f = F.normalize(feats.float(), dim=-1)
    return f @ f.transpose(-1, -2)


def proxy_weights(sim: torch.Tensor, beta: float, gamma: float, pooled: bool = False,
                  inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The proxy attention before its row normalisation: exp(gamma (S - 1)) on the kept
    entries (S >= beta mean S; an all-masked row keeps its largest entries), 0 elsewhere, and
    its row sums. A = weights / sums (:func:`proxy_attention`); the constant exp(-gamma) and
    exp(gamma beta mean S) cancel in the normalisation, and S <= 1 keeps exp from overflowing.
    sim: B x P x P (``inplace``: float32 that may be overwritten). Returns B x P x P and
    B x P x 1 float32."""
    sim = sim.float()
    mean = sim.mean() if pooled else sim.mean(dim=(-1, -2), keepdim=True)
    thr = mean * float(beta)
    masked = sim < thr
    # a row is all masked only if its diagonal (its largest entry: 1 for unit features) is
    if bool((sim.diagonal(dim1=-2, dim2=-1) < thr.reshape(-1, 1)).any()):
        empty = masked.all(-1, keepdim=True)
        masked &= ~(empty & (sim == sim.amax(-1, keepdim=True)))
    w = (sim if inplace else sim.clone()).sub_(1.0).mul_(float(gamma)).exp_()
    w.masked_fill_(masked, 0.0)
    return w, w.sum(-1, keepdim=True)


def proxy_attention(sim: torch.Tensor, beta: float, gamma: float,
                    pooled: bool = False) -> torch.Tensor:
    """A = softmax(gamma (S - beta mean S)), entries below zero masked (ProxyCLIP
    ``transformer.py`` 573-578). sim: B x P x P. The mean is over each window's S, or over all
    windows with ``pooled`` (Trident batches its windows, ``torch.mean`` pools them). A row with
    every entry masked keeps its largest entries (see the module docstring). Returns B x P x P
    float32, rows summing to 1."""
    w, total = proxy_weights(sim, beta, gamma, pooled)
    return w / total


def resize_to_cells(values: torch.Tensor, grid: tuple[int, int],
                    cells: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of per-token values from CLIP's patch grid to the
    vision model's: B x (gh gw) x D -> B x (vh vw) x D float32 (ProxyCLIP 580-582)."""
    b, _, d = values.shape
    if tuple(grid) == tuple(cells):
        return values.float()
    rh = linear_resize_matrix(grid[0], cells[0])                     # vh x gh
    rw = linear_resize_matrix(grid[1], cells[1])                     # vw x gw
    x = values.float().view(b, grid[0], grid[1], d)
    x = torch.einsum("ih,bhwd->biwd", rh, x)
    x = torch.einsum("jw,biwd->bijd", rw, x)
    return x.reshape(b, cells[0] * cells[1], d)


def proxy_output(sim: torch.Tensor, values: torch.Tensor, grid: tuple[int, int],
                 cells: tuple[int, int], beta: float, gamma: float,
                 pooled: bool = False, inplace: bool = False) -> torch.Tensor:
    """The reduced block's output out_proj(A up(V)) = A up(U): sim B x P_v x P_v, values U
    B x P_clip x D (already through out_proj) -> B x P_v x D float32. Computed as (A R) U with
    R = Rh (x) Rw the bilinear resize (separable: A R costs P_v^2 (v + g) instead of A up(U)'s
    P_v^2 D; the tests check it against the resize then the product)."""
    w, total = proxy_weights(sim, beta, gamma, pooled, inplace)     # A = w / total
    if tuple(grid) == tuple(cells):
        return (w @ values.float()) / total
    b, p, _ = w.shape
    rh = linear_resize_matrix(grid[0], cells[0])                     # vh x gh
    rw = linear_resize_matrix(grid[1], cells[1])                     # vw x gw
    a = w.view(b * p, cells[0], cells[1])
    a = torch.matmul(rh.T, a)                                        # (B P) x gh x vw
    a = torch.matmul(a, rw)                                          # (B P) x gh x gw
    return (a.view(b, p, -1) @ values.float()) / total


# --- extract ---------------------------------------------------------------------------------
@torch.no_grad()
def last_values(visual: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """v_L of every token: blocks 1..L-1 as CLIP runs them, then the value projection of
    block L's ``ln_1``. windows: B x 3 x ph x pw (CLIP-normalised) -> B x T x D."""
    blocks = visual.transformer.resblocks
    x = embed_windows(visual, windows)
    for block in blocks[:-1]:
        x = finish_block(block, x, *split_qkv(block, x))
    return split_qkv(blocks[-1], x)[2]


def proxy_cells(models: Mapping[str, VisionModel], grid: WindowGrid) -> dict[str, list[int]]:
    """Each vision model's token grid of one (padded) window."""
    return {name: list(m.grid(grid.ph, grid.pw)) for name, m in models.items()}


@torch.no_grad()
def vision_features(model: VisionModel, windows: torch.Tensor, mean: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    """Unit-norm patch features of the vision model: B x (vh vw) x C float32 from CLIP-normalised
    windows (re-normalised to ImageNet's statistics first)."""
    feats = model.features(imagenet_pixels(windows, mean, std))     # B x C x vh x vw
    return F.normalize(feats.flatten(2).transpose(1, 2), dim=-1).cpu()


def proxy_geometry(models: Mapping[str, VisionModel], grid: WindowGrid,
                   image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Each vision model's window upsampling (rows H x A vh, cols W x B vw, float32)."""
    out = {}
    for name, m in models.items():
        rows, cols = separable_upsampling(grid, image_size, m.grid(grid.ph, grid.pw))
        out[f"proxy.rows.{name}"], out[f"proxy.cols.{name}"] = rows, cols
    return out


# --- decode ----------------------------------------------------------------------------------
def chosen_vision(params: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The vision model the knob ``vision`` names (null: the first extracted); OvssError if its
    features are not in the evidence."""
    cells = meta.get("proxy_cells") or {}
    name = params.get("vision") or next(iter(cells), None)
    if name not in cells:
        raise OvssError(f"clipseg: vision model {name!r} was not extracted (settings.vision "
                        f"lists {', '.join(cells) or 'none'})")
    return str(name)


def proxy_window_outputs(ev_tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                         params: Mapping[str, Any], pooled: bool = False
                         ) -> tuple[torch.Tensor, str]:
    """Z = A up(U) of every window on the chosen vision model's grid: W x P_v x D float32."""
    name = chosen_vision(params, meta)
    cells = tuple(meta["proxy_cells"][name])
    if f"proxy.sim.{name}" in ev_tensors:
        sim = unpack_symmetric(ev_tensors[f"proxy.sim.{name}"], cells[0] * cells[1])
    else:
        sim = proxy_similarity(ev_tensors[f"proxy.feat.{name}"])
    z = proxy_output(sim, ev_tensors["proxy.values"], tuple(meta["grid"][2:]), cells,
                     float(params["beta"]), float(params["gamma"]), pooled, inplace=True)
    return z, name


def proxy_logits(features: Any, ev_tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any], params: Mapping[str, Any],
                 scale: float) -> torch.Tensor:
    """``scale * cos`` of every name at the original image size: H x N x W float32.
    features: rows of block outputs (... x D) -> unit dense features (... x E)."""
    z, name = proxy_window_outputs(ev_tensors, meta, params)
    cos = features(z) @ ev_tensors["text"].float().T * scale          # W x P_v x N
    a, b = meta["grid"][:2]
    vh, vw = meta["proxy_cells"][name]
    return upsample(mosaic(cos, a, b, vh, vw), ev_tensors[f"proxy.rows.{name}"],
                    ev_tensors[f"proxy.cols.{name}"])


def check_vision_names(names: Sequence[str]) -> None:
    if len(set(names)) != len(names):
        raise OvssError(f"clipseg: settings.vision names a model twice: {list(names)}")
