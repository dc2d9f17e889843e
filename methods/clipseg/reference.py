"""The straight way: one full forward per knob setting, as the paper's code would run a trial.

``full_forward_probs(seg, image, classes, params)`` walks every window through open_clip's own
blocks (``block(x)``), builds the reformed final block for the given knobs from the recorded
block inputs, does the family's sliding-window upsampling one ``F.interpolate`` at a time and,
with ``pamr_steps`` > 0, PAMR where NACLIP runs it (on the cosines at the original size, guided
by the normalised input resized there). It shares no shortcut with extract/decode (no Gram
packing, no pre-multiplied out_proj, no separable upsampling, no stored anomaly fill or fused
pieces for scclip), so the tests use it as the ground truth for ``decode(extract(x), p)`` and
``bench/clipseg.py`` times it as the naive search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, check_image
from methods.clipseg.family import attend, fixed_outputs, naclip_probs
from methods.clipseg.formulas import (
    coherence_residual_attention,
    deep_layer_output,
    deep_value,
    dense_output,
    key_gram,
    relation_attention,
)
from methods.clipseg.labels import labels_from_probs, names_to_classes
from methods.clipseg.reference_second import (
    proxy_window_logits,
    refine_straight,
    trident_logits_straight,
)
from methods.clipseg.scclip import (
    FinalAttention,
    adjust_weights,
    anomalous_tokens,
    cosine_gram,
    fill_anomalies,
    self_calibrated_attention,
)
from methods.clipseg.segmenter import ClipSegSegmenter
from methods.clipseg.vit import embed_windows
from methods.clipseg.windows import window_batch
from methods.pamr import pamr, parse_dilations


def _keys(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    dim = x.shape[-1]
    return F.linear(block.ln_1(x), block.attn.in_proj_weight[dim:2 * dim],
                    block.attn.in_proj_bias[dim:2 * dim])


@torch.no_grad()
def scclip_features(seg: ClipSegSegmenter, pixels: torch.Tensor,
                    params: Mapping[str, Any]) -> torch.Tensor:
    """SC-CLIP's dense features of the windows (B x P x E, unit norm) for one knob setting."""
    visual = seg.visual
    blocks = visual.transformer.resblocks
    x = embed_windows(visual, pixels)
    feats = []
    for block in blocks[:-1]:
        x = block(x)
        feats.append(x)
    grid = (pixels.shape[-2] // seg.patch, pixels.shape[-1] // seg.patch)
    flags = anomalous_tokens(feats[-1][:, 1:], int(seg.settings["lof_neighbors"]),
                             float(seg.settings["lof_contamination"]))
    beta, gamma, res = (float(params["adjust_beta"]), float(params["mid_gamma"]),
                        float(params["res_cls"]))
    m = cosine_gram(fill_anomalies(feats[int(params["pre_adjust_idx"])][:, 1:], flags, grid))
    x = adjust_weights(m, beta) @ fill_anomalies(feats[-1][:, 1:], flags, grid)
    final = blocks[-1]
    dim = x.shape[-1]
    w, b = final.attn.in_proj_weight, final.attn.in_proj_bias
    block = FinalAttention(final.ln_1, w[dim:2 * dim], b[dim:2 * dim], w[2 * dim:], b[2 * dim:],
                           final.attn.out_proj, final.attn.num_heads)
    out = self_calibrated_attention(x, m, block, gamma) + res * feats[-1][:, :1]
    w_post = adjust_weights(cosine_gram(feats[int(params["post_adjust_idx"])][:, 1:]), beta)
    s = torch.stack(feats[int(params["multi_start_idx"]):int(params["multi_end_idx"])]).sum(0)
    fused = self_calibrated_attention(s[:, 1:], m, block, gamma) + res * s[:, :1]
    z = w_post @ out + w_post @ fused
    return F.normalize(visual.ln_post(z) @ visual.proj, dim=-1)


@torch.no_grad()
def window_features(seg: ClipSegSegmenter, pixels: torch.Tensor,
                    params: Mapping[str, Any]) -> torch.Tensor:
    """Dense features Z of the windows (B x P x E, unit norm) for one knob setting."""
    if params["attention"] == "scclip":
        return scclip_features(seg, pixels, params)
    visual = seg.visual
    blocks = visual.transformer.resblocks
    n = len(blocks)
    x = embed_windows(visual, pixels)
    inputs = []
    for block in blocks[:-1]:
        inputs.append(x)
        x = block(x)
    inputs.append(x)                                     # inputs[i]: input of block i + 1
    final = blocks[-1]
    variant = params["attention"]
    terms = [deep_value(inputs[n - 1], final)]          # v_L = w_L^v ln_1^L(x_{L-1})
    for i in range(1, -int(params.get("dsi_start", -1))):
        terms.append(deep_value(deep_layer_output(inputs[n - 1 - i], blocks[n - 1 - i]), final))
    value = torch.stack(terms).mean(0)
    if variant in ("clearclip", "sclip", "maskclip", "naclip"):
        z = final.ln_1(x)
        dim = x.shape[-1]
        q, k, v = F.linear(z, final.attn.in_proj_weight, final.attn.in_proj_bias).chunk(3, -1)
        if variant == "naclip":
            gh, gw = pixels.shape[-2] // seg.patch, pixels.shape[-1] // seg.patch
            out = attend(naclip_probs(k, final.attn.num_heads, (gh, gw),
                                      float(params["gaussian_std"])), v, final.attn.out_proj)
        else:
            out = fixed_outputs(final, x, q, k, v)[variant][:, 1:]
        assert out.shape[-1] == dim
        return F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
    if variant == "qk":                                 # CLIP's own per-head maps
        z = final.ln_1(x)
        _, probs = final.attn(z, z, z, need_weights=True, average_attn_weights=False)
        out = attend(probs[:, :, 1:], value, final.attn.out_proj)
        return F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
    layer = n if variant == "kk_last" else int(params["layer"])
    gram = key_gram(_keys(blocks[layer - 1], inputs[layer - 1]))
    relation = None
    if variant == "cra":
        g = relation_attention(gram[:, 1:, 1:], float(params["epsilon"]),
                               int(params["min_pts"]))
        relation = torch.zeros_like(gram)
        relation[:, 1:, 1:] = g
    attn = coherence_residual_attention(gram, float(params["tau"]), relation)
    z = dense_output(attn, value, out_proj=final.attn.out_proj)
    return F.normalize(visual.ln_post(z[:, 1:]) @ visual.proj, dim=-1)


@torch.no_grad()
def full_forward_probs(seg: ClipSegSegmenter, image: np.ndarray, classes: ClassSet,
                       params: Mapping[str, Any]) -> torch.Tensor:
    """C_fg x H x W class probabilities by a full forward with these knobs (float32)."""
    image = check_image(image)
    seg.check_params(params, seg.num_layers)
    pixels = seg.preprocess(image)
    size = tuple(pixels.shape[1:])
    grid = seg.window_grid(size)
    names, owner = seg.class_names(classes)
    text = seg.text_embeddings(names)
    variant = params["attention"]
    if variant == "trident":
        logits = trident_logits_straight(seg, pixels, grid, image, params, text)
    else:
        windows = window_batch(pixels, grid)
        canvas = torch.zeros(len(names), *size)
        count = torch.zeros(1, *size)
        chunk = max(1, int(seg.settings["chunk"]))
        offsets = [(y, x) for y in grid.ys for x in grid.xs]
        top, left = grid.top, grid.left
        for s in range(0, len(windows), chunk):
            if variant == "proxyclip":
                cos = proxy_window_logits(seg, windows[s:s + chunk], params, text)
            else:
                feats = window_features(seg, windows[s:s + chunk].to(seg.device),
                                        params).float().cpu()
                cos = (feats @ text.T).transpose(1, 2).reshape(-1, len(names), grid.gh, grid.gw)
            up = F.interpolate(cos, size=(grid.ph, grid.pw), mode="bilinear", align_corners=False)
            for (y, x), win in zip(offsets[s:s + chunk], up):
                canvas[:, y:y + grid.wh, x:x + grid.ww] += win[:, top:top + grid.wh,
                                                               left:left + grid.ww]
                count[:, y:y + grid.wh, x:x + grid.ww] += 1
        logits = F.interpolate((canvas / count)[None], size=image.shape[:2], mode="bilinear",
                               align_corners=False)[0]
    if int(params["pamr_steps"]) > 0:               # NACLIP naclip.py 126-132
        guide = F.interpolate(seg.normalise(seg.resized(image))[None], size=image.shape[:2],
                              mode="bilinear", align_corners=False)[0]
        logits = pamr(guide, logits, int(params["pamr_steps"]),
                      parse_dilations(params["pamr_dilations"]))
    probs = torch.softmax(seg.logit_scale(params) * logits, 0)
    return names_to_classes(probs, owner)


def full_forward_labels(seg: ClipSegSegmenter, image: np.ndarray, classes: ClassSet,
                        params: Mapping[str, Any]) -> np.ndarray:
    """H x W int64 label map by a full forward (the naive per-trial pipeline)."""
    probs = full_forward_probs(seg, image, classes, params)
    mode = seg.background_mode(classes)
    labels = labels_from_probs(probs, mode, seg.threshold(params), seg.settings["area_threshold"])
    if params["attention"] == "trident" and params.get("sam_refine"):
        if mode == "threshold":
            probs = torch.cat([torch.zeros_like(probs[:1]), probs])
        labels = refine_straight(seg, image, torch.from_numpy(labels), probs,
                                 params).numpy().astype(np.int64)
    return labels
