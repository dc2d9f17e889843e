"""Trident (Shi et al., ICCV 2025): ProxyCLIP windows spliced into one map, then SAM's global
attention as guidance (YuHengsss/Trident ``trident.py``, ``open_clip/transformer.py`` 502-659).

1. The image (short side resized) is resized again so both sides are multiples of 16 and at
   least the window (``seg_utils/utils.py`` 9-25, :func:`aligned_size`); windows on it.
2. Per window, ProxyCLIP's reduced block with the vision model (DINO ViT-B/16 in Trident) and
   beta, gamma; the mean of S pools all windows (they run as one batch). Z = A up(U).
3. The windows' Z (features, not logits) are pasted into a canvas on CLIP's 16 px grid (times
   the vision model's ratio), overlaps averaged, and the canvas resized bilinearly to SAM's grid
   (``transformer.py`` 597-618, 634). All linear and separable: ``canvas_operators``.
4. SAM ViT-B ``set_image`` on the original image resized to multiples of 16 (``trident.py``
   135-154); its last (global) block's per-head softmax attention P_h and values v_h on the
   valid grid (input size / 16). C_h = cos(v_h); tau_m = cos_fac mean_{h,n} C_h(m, n) (with
   ``refine_neg_cos`` false a negative tau becomes 0.6), capped at 0.9; G = rows of the head mean
   of P_h [C_h > tau] normalised to sum 1 (``transformer.py`` 643-659; :func:`guided`).
5. Y = G X (no out_proj), ln_post, proj, cosine with the names on SAM's grid, bilinear to the
   image. Cityscapes (``sam_split: 2``): SAM on the left and right halves, one G each, the
   canvas split in two halves, the outputs side by side (``trident.py`` 141-152,
   ``transformer.py`` 621-633).

Evidence: ProxyCLIP's (``proxy.values``, ``proxy.feat.<name>``), and per SAM part p the last
block's q, k, v of the valid tokens (``sam.q.p`` ... N_p x D, evidence dtype) and the log of each
row's softmax normaliser over all of SAM's tokens (``sam.lse.p``, heads x N_p float32, padding
included, as SAM's softmax sees it); P_h is rebuilt at decode from q, k and the block's
relative position tables (decode head). Decode knobs: beta, gamma, cos_fac, refine_neg_cos, the
vision model, and those of the SAM refinement (sam_refine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import Evidence
from methods.clipseg.labels import upsample
from methods.clipseg.proxy import proxy_window_outputs
from methods.clipseg.windows import WindowGrid, linear_resize_matrix


def aligned_size(h: int, w: int, stride: int, crop: int) -> tuple[int, int]:
    """Trident's ``preprocess_image``: unchanged when both sides are multiples of ``stride``;
    else the long side rounded up to one, the short side scaled alike, both rounded up to
    multiples of ``stride`` and at least ``crop``."""
    if h % stride == 0 and w % stride == 0:
        return h, w
    longer = max(h, w)
    dst = longer if longer % stride == 0 else (longer // stride + 1) * stride
    nh, nw = int(h * dst / longer), int(w * dst / longer)
    nh = nh if nh % stride == 0 else (nh // stride + 1) * stride
    nw = nw if nw % stride == 0 else (nw // stride + 1) * stride
    return max(nh, crop), max(nw, crop)


def sam_image(image: np.ndarray, stride: int) -> np.ndarray:
    """The image Trident gives SAM: resized (cv2 bilinear) to sides rounded up to ``stride``."""
    import cv2

    h, w = image.shape[:2]
    th, tw = -(-h // stride) * stride, -(-w // stride) * stride
    if (th, tw) == (h, w):
        return image
    return cv2.resize(image, (tw, th))


# --- geometry --------------------------------------------------------------------------------
def _axis(offs: tuple[int, ...], g: int, v: int, patch: int, n_canvas: int
          ) -> tuple[torch.Tensor, int]:
    """One axis of the canvas: (n_canvas r) x (len(offs) v) paste-and-average operator and the
    ratio r (the vision grid v of a window against CLIP's g; resized to g r when v is no
    multiple of g, as ``guidance_attn`` does)."""
    if v % g:
        r = int(round(v / g))
        win = linear_resize_matrix(v, g * r)                          # (g r) x v
    else:
        r = v // g
        win = torch.eye(v)
    place = torch.zeros(n_canvas * r, len(offs) * v)
    count = torch.zeros(n_canvas * r)
    for a, o in enumerate(offs):
        s = (o // patch) * r
        place[s:s + g * r, a * v:(a + 1) * v] += win
        count[s:s + g * r] += 1
    return place / count[:, None], r


def canvas_operators(grid: WindowGrid, patch: int, cells: tuple[int, int],
                     parts: list[list[int]]) -> dict[str, torch.Tensor]:
    """rows (vh x A v_h) and, per SAM part p, cols.p (vw_p x B v_w): the paste, overlap average
    and resize to SAM's grid of step 3, ``X_p = rows @ mosaic @ cols.p^T`` (float32)."""
    rows, _ = _axis(grid.ys, grid.gh, cells[0], patch, grid.size[0] // patch)
    cols, _ = _axis(grid.xs, grid.gw, cells[1], patch, grid.size[1] // patch)
    vh = parts[0][0]
    out = {"rows": linear_resize_matrix(rows.shape[0], vh) @ rows}
    wc = cols.shape[0]
    bounds = [(0, wc)] if len(parts) == 1 else [(0, wc // 2), (wc // 2, wc)]
    for p, ((lo, hi), (_, vw)) in enumerate(zip(bounds, parts)):
        out[f"cols.{p}"] = linear_resize_matrix(hi - lo, vw) @ cols[lo:hi]
    return out


# --- SAM guidance ----------------------------------------------------------------------------
@torch.no_grad()
def sam_guidance_pass(predictor: Any, image: np.ndarray, patch: int = 16
                      ) -> dict[str, Any]:
    """``set_image`` on one image part; the last block's q, k, v of the valid tokens
    (N x D, heads concatenated, row-major over the valid vh x vw grid), each valid row's
    log-sum-exp of its attention logits over all tokens (heads x N float32), the valid grid and
    the embedding (1 x C x g x g)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    attn = predictor.model.image_encoder.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}
    hook = attn.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    try:
        predictor.set_image(image)
    finally:
        hook.remove()
    x = seen["x"].float()                                             # 1 x g x g x D
    _, gh, gw, dim = x.shape
    heads = attn.num_heads
    vh, vw = int(predictor.input_size[0] // patch), int(predictor.input_size[1] // patch)
    qkv = F.linear(x, attn.qkv.weight.float(),
                   None if attn.qkv.bias is None else attn.qkv.bias.float())
    q, k, v = qkv.reshape(gh, gw, 3, dim).unbind(2)                  # g x g x D each
    rh = get_rel_pos(gh, gh, attn.rel_pos_h.float())                  # g x g x d
    rw = get_rel_pos(gw, gw, attn.rel_pos_w.float())
    d = dim // heads
    qg = q[:vh, :vw].reshape(vh, vw, heads, d)
    kf = k.reshape(-1, heads, d).transpose(0, 1)                      # H x G x d
    lse = torch.empty(heads, vh * vw, device=x.device)
    for h in range(heads):
        rel_h = torch.einsum("yxc,ykc->yxk", qg[:, :, h], rh[:vh]).reshape(-1, gh)
        rel_w = torch.einsum("yxc,xkc->yxk", qg[:, :, h], rw[:vw]).reshape(-1, gw)
        logits = (qg[:, :, h].reshape(-1, d) * attn.scale) @ kf[h].T  # N x G
        logits = logits.view(-1, gh, gw) + rel_h[:, :, None] + rel_w[:, None, :]
        lse[h] = torch.logsumexp(logits.flatten(1), dim=-1)
    return {"q": q[:vh, :vw].reshape(-1, dim).cpu(), "k": k[:vh, :vw].reshape(-1, dim).cpu(),
            "v": v[:vh, :vw].reshape(-1, dim).cpu(), "lse": lse.cpu(), "grid": [vh, vw],
            "full": [gh, gw], "embedding": predictor.features.detach().float().cpu()}


def guided(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
           rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int],
           full: tuple[int, int], heads: int, cos_fac: float, refine_neg_cos: bool,
           x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Y = G x with G of step 4 (N x N, rows summing to 1) never materialised: N x D float32.

    q, k, v: N x D (SAM's last block, valid tokens, heads concatenated); lse: heads x N, the
    log-sum-exp of each row's logits over SAM's ``full`` grid; rel_pos_h / _w: the block's
    relative position tables; x: N x D. P_h(m, n) = exp(scale q_m.k_n + q_m.Rh[m_y, n_y] +
    q_m.Rw[m_x, n_x] - lse_m) (SAM's softmax, read at the valid keys); C_h = cos(v_h(m), v_h(n)).

    Per chunk of rows and head: one product for the logits, the two relative terms added in
    place on its rows x vh x vw view, exp; one product for C_h, turned into its 0 / 1 mask in
    place (``gt_``); the masked P_h accumulated by one ``addcmul_``. A chunk's rows of G x are
    (acc x) / rowsum(acc): G's rows are a row scaling of acc. No N x N tensor is allocated
    (L - lse <= 0 up to rounding, so exp never overflows and 0 x exp is 0).
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    n, dim = q.shape
    d = dim // heads
    vh, vw = grid
    qh = q.float().view(n, heads, d).transpose(0, 1)                  # H x N x d
    kt = k.float().view(n, heads, d).permute(1, 2, 0)                 # H x d x N
    vn = F.normalize(v.float().view(n, heads, d).transpose(0, 1), dim=-1)
    vt = vn.transpose(1, 2).contiguous()                              # H x d x N
    rh = get_rel_pos(full[0], full[0], rel_pos_h.float())[:vh, :vh]  # vh x vh x d
    rw = get_rel_pos(full[1], full[1], rel_pos_w.float())[:vw, :vw]
    qg = qh.reshape(heads, vh, vw, d)
    rel_h = torch.einsum("hyxc,ykc->hyxk", qg, rh).reshape(heads, n, vh) - lse[:, :, None]
    rel_w = torch.einsum("hyxc,xkc->hyxk", qg, rw).reshape(heads, n, vw)
    # tau_m = cos_fac * mean over heads and keys of C_h(m, .) = mean_h v_m . mean_n v_n
    tau = float(cos_fac) * (vn * vn.mean(1, keepdim=True)).sum(-1).mean(0)   # N
    if not refine_neg_cos:
        tau = torch.where(tau < 0.0, torch.full_like(tau, 0.6), tau)
    tau = torch.where(tau > 0.9, torch.full_like(tau, 0.9), tau)[:, None]
    qs = qh * d ** -0.5
    x = x.float()
    out = torch.empty(n, x.shape[1])
    chunk = min(chunk, n)
    acc, p, c = torch.empty(chunk, n), torch.empty(chunk, n), torch.empty(chunk, n)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        a = acc[:e - s].zero_()
        for h in range(heads):
            ps = torch.mm(qs[h, s:e], kt[h], out=p[:e - s])            # scale q.k
            ps.view(e - s, vh, vw).add_(rel_h[h, s:e, :, None]).add_(rel_w[h, s:e, None, :])
            ps.exp_()                                                  # P_h rows
            cs = torch.mm(vn[h, s:e], vt[h], out=c[:e - s]).gt_(tau[s:e])  # [C_h > tau]
            a.addcmul_(ps, cs)
        torch.mm(a, x, out=out[s:e]).div_(a.sum(-1, keepdim=True))
    return out


# --- decode ----------------------------------------------------------------------------------
def trident_grid_features(ev: Evidence, params: Mapping[str, Any], heads_tables: Mapping[str,
                          torch.Tensor], sam_heads: int, chunk: int = 256) -> torch.Tensor:
    """Y = G X on SAM's grid, every part side by side: vh x sum(vw_p) x D float32. X_p =
    rows @ mosaic @ cols.p^T per channel, computed with the channels last (the layout G X
    reads): the windows' blocks laid out as (A vh) x (B vw D), rows applied by one product,
    cols.p by one batched product over SAM's rows."""
    t, meta = ev.tensors, ev.meta
    z, name = proxy_window_outputs(t, meta, params, pooled=True)        # W x P_v x D
    a, b = meta["grid"][:2]
    vh_v, vw_v = meta["proxy_cells"][name]
    dim = z.shape[-1]
    z = z.view(a, b, vh_v, vw_v, dim).transpose(1, 2).reshape(a * vh_v, b * vw_v * dim)
    x = (t[f"trident.rows.{name}"] @ z).view(-1, b * vw_v, dim)       # vh x B vw x D
    outs = []
    for p, (vh, vw) in enumerate(meta["sam_parts"]):
        xp = torch.matmul(t[f"trident.cols.{name}.{p}"], x).view(vh * vw, dim)
        y = guided(t[f"sam.q.{p}"], t[f"sam.k.{p}"], t[f"sam.v.{p}"], t[f"sam.lse.{p}"],
                   heads_tables["sam.rel_pos_h"], heads_tables["sam.rel_pos_w"], (vh, vw),
                   tuple(meta["sam_full"]), sam_heads, float(params["cos_fac"]),
                   bool(params["refine_neg_cos"]), xp, chunk)
        outs.append(y.view(vh, vw, -1))
    return torch.cat(outs, dim=1)


def trident_logits(features: Any, ev: Evidence, params: Mapping[str, Any],
                   head: Mapping[str, torch.Tensor], sam_heads: int, scale: float
                   ) -> torch.Tensor:
    """``scale * cos`` of every name at the original image size: H x N x W float32."""
    y = trident_grid_features(ev, params, head, sam_heads)           # vh x VW x D
    cos = features(y) @ ev.tensors["text"].float().T * scale         # vh x VW x N
    h, w = ev.meta["image_size"]
    rows = linear_resize_matrix(y.shape[0], h)
    cols = linear_resize_matrix(y.shape[1], w)
    return upsample(cos.permute(2, 0, 1).contiguous(), rows, cols)
