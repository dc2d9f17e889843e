"""The straight way for ``proxyclip`` and ``trident``: one full forward per knob setting.

Every window goes through open_clip's own blocks and the vision model; the reduced block
applies out_proj after the attention (no pre-multiplied U), windows are resized and averaged
one ``F.interpolate`` at a time, SAM runs ``set_image`` on the image and its attention is read
through segment-anything's own ``add_decomposed_rel_pos`` (no cached q / k / log-normaliser),
and the refinement decodes prompts on that fresh embedding. Used by the tests as the ground
truth of ``decode(extract(x), p)`` and by ``bench/frontier.py`` as the naive search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.clipseg.proxy import proxy_attention, proxy_similarity
from methods.clipseg.trident import sam_image
from methods.clipseg.vfm import imagenet_pixels
from methods.clipseg.vit import embed_windows


def vision_name(seg: Any, params: Mapping[str, Any]) -> str:
    return str(params.get("vision") or seg.settings["vision"][0])


@torch.no_grad()
def reduced_block(seg: Any, windows: torch.Tensor, params: Mapping[str, Any],
                  pooled: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """out_proj(A up(V)) of every window: B x (vh vw) x D float32 and the vision grid."""
    visual = seg.visual
    blocks = visual.transformer.resblocks
    x = embed_windows(visual, windows.to(seg.device))
    for block in blocks[:-1]:
        x = block(x)
    final = blocks[-1]
    dim = x.shape[-1]
    v = F.linear(final.ln_1(x), final.attn.in_proj_weight[2 * dim:],
                 final.attn.in_proj_bias[2 * dim:])[:, 1:].float()
    vfm = seg.vision(vision_name(seg, params))
    feats = vfm.features(imagenet_pixels(windows, seg.mean, seg.std))      # B x C x vh x vw
    cells = tuple(feats.shape[-2:])
    attn = proxy_attention(proxy_similarity(feats.flatten(2).transpose(1, 2).cpu()),
                           float(params["beta"]), float(params["gamma"]), pooled)
    gh, gw = windows.shape[-2] // seg.patch, windows.shape[-1] // seg.patch
    up = F.interpolate(v.cpu().reshape(-1, gh, gw, dim).permute(0, 3, 1, 2), size=cells,
                       mode="bilinear", align_corners=False)
    up = up.permute(0, 2, 3, 1).reshape(len(windows), -1, dim)
    return final.attn.out_proj(attn @ up).float(), cells


@torch.no_grad()
def proxy_window_logits(seg: Any, windows: torch.Tensor, params: Mapping[str, Any],
                        text: torch.Tensor) -> torch.Tensor:
    """ProxyCLIP's window cosines with the names: B x N x vh x vw."""
    out, cells = reduced_block(seg, windows, params)
    cos = F.normalize(seg.visual.ln_post(out) @ seg.visual.proj, dim=-1).float() @ text.T
    return cos.transpose(1, 2).reshape(len(windows), -1, *cells)


@torch.no_grad()
def trident_logits_straight(seg: Any, pixels: torch.Tensor, grid: Any, image: np.ndarray,
                            params: Mapping[str, Any], text: torch.Tensor) -> torch.Tensor:
    """Trident's cosines with the names at the image size: N x H x W (one full forward)."""
    from methods.clipseg.windows import window_batch

    windows = window_batch(pixels, grid)
    out, (vh, vw) = reduced_block(seg, windows, params, pooled=True)
    dim = out.shape[-1]
    gh, gw, p = grid.gh, grid.gw, seg.patch
    ratio = vw // gw if vw % gw == 0 else int(round(vh / gh))
    v_img = out.reshape(-1, vh, vw, dim).permute(0, 3, 1, 2)
    if vw % gw:
        v_img = F.interpolate(v_img, size=(gh * ratio, gw * ratio), mode="bilinear",
                              align_corners=False)
    hc, wc = grid.size[0] // p * ratio, grid.size[1] // p * ratio
    canvas, count = torch.zeros(dim, hc, wc), torch.zeros(1, hc, wc)
    offsets = [(y, x) for y in grid.ys for x in grid.xs]
    for (y, x), win in zip(offsets, v_img):
        ys, xs = y // p * ratio, x // p * ratio
        canvas[:, ys:ys + gh * ratio, xs:xs + gw * ratio] += win
        count[:, ys:ys + gh * ratio, xs:xs + gw * ratio] += 1
    canvas = canvas / count
    sam = seg.vision(str(seg.settings["sam"])).module
    img = sam_image(image, p)
    split = int(seg.settings.get("sam_split") or 1)
    halves = ([img] if split == 1 else
              [img[:, :img.shape[1] // 2], img[:, img.shape[1] // 2:]])
    pieces = ([canvas] if split == 1 else [canvas[:, :, :wc // 2], canvas[:, :, wc // 2:]])
    outs = []
    for part, piece in zip(halves, pieces):
        probs, values, (sh, sw) = sam_last_attention(sam, np.ascontiguousarray(part))
        x = F.interpolate(piece[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
        g = sam_guidance_straight(probs, values, float(params["cos_fac"]),
                                  bool(params["refine_neg_cos"]))
        outs.append((g @ x.flatten(1).T).view(sh, sw, dim))
    y = torch.cat(outs, dim=1)
    cos = F.normalize(seg.visual.ln_post(y) @ seg.visual.proj, dim=-1).float() @ text.T
    return F.interpolate(cos.permute(2, 0, 1)[None], size=image.shape[:2], mode="bilinear",
                         align_corners=False)[0]


@torch.no_grad()
def sam_last_attention(sam: torch.nn.Module, image: np.ndarray
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``set_image`` on an image part; the last block's per-head softmax attention (H x N x N)
    and values (H x N x d) on the valid tokens (input size / 16), as Trident reads them."""
    from segment_anything import SamPredictor
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    predictor = SamPredictor(sam)
    attn = sam.image_encoder.blocks[-1].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        predictor.set_image(image)
    finally:
        hook.remove()
    x = seen["x"]
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    logits = add_decomposed_rel_pos((q * attn.scale) @ k.transpose(-2, -1), q, attn.rel_pos_h,
                                    attn.rel_pos_w, (h, w), (h, w))
    probs = logits.softmax(dim=-1)
    vh, vw = predictor.input_size[0] // 16, predictor.input_size[1] // 16
    probs = probs.view(attn.num_heads, h, w, h, w)[:, :vh, :vw, :vh, :vw]
    values = v.view(attn.num_heads, h, w, -1)[:, :vh, :vw]
    return probs.reshape(attn.num_heads, vh * vw, vh * vw), values.reshape(
        attn.num_heads, vh * vw, -1), (vh, vw)


def sam_guidance_straight(probs: torch.Tensor, values: torch.Tensor, cos_fac: float,
                          refine_neg_cos: bool) -> torch.Tensor:
    """G from SAM's attention and values (H x N x N, H x N x d): N x N."""
    vn = F.normalize(values, dim=-1)
    sim = vn @ vn.transpose(1, 2)
    tau = cos_fac * sim.mean(0).mean(-1, keepdim=True)                      # N x 1
    if not refine_neg_cos:
        tau = torch.where(tau < 0, torch.full_like(tau, 0.6), tau)
    tau = tau.clamp(max=0.9)
    kept = torch.where(sim > tau, probs, torch.zeros_like(probs)).mean(0)
    return kept / kept.sum(-1, keepdim=True)


@torch.no_grad()
def refine_straight(seg: Any, image: np.ndarray, labels: torch.Tensor, probs: torch.Tensor,
                    params: Mapping[str, Any]) -> torch.Tensor:
    """Trident's refinement on a fresh ``set_image`` of the whole SAM image (the full SAM)."""
    from segment_anything import SamPredictor

    from methods.clipseg.sam_refine import sam_refinement

    sam = seg.vision(str(seg.settings["sam"])).module
    predictor = SamPredictor(sam)
    predictor.set_image(sam_image(image, seg.patch))
    return sam_refinement(labels, probs, sam, predictor.features, predictor.input_size,
                          predictor.original_size, params)
