"""The second vision model's share of ``clipseg``: which models a segmenter holds, what extract
adds to the evidence for ``proxyclip`` and ``trident``, what the decode head adds (SAM's
relative position tables and prompt decoder), and the checks that need no weights.

Settings (``conf/methods/clipseg.yaml``): ``vision`` lists the vision models extract runs on
every window (their names in ``vision_models``), ``sam`` names Trident's SAM (run once per
image part), ``family`` whether the evidence of the family's variants is extracted too.

Evidence added (W windows, P_c CLIP patches, P_v vision tokens, D width, N_p SAM tokens):

=========================  ===================  =============================================
``proxy.values``           W x P_c x D, dtype   U = out_proj(v_L) of the patches
``proxy.sim.<name>``       W x P_v(P_v+1)/2     S = F F^T of each vision model's unit features
                           dtype                (packed upper triangle), or when smaller
``proxy.feat.<name>``      W x P_v x C, dtype   F itself (:func:`stores_similarity`)
``proxy.rows/cols.<name>`` float32              window upsampling on that model's grid
``trident.rows.<name>``,   float32              canvas paste + average + resize to SAM's grid
``trident.cols.<name>.p``
``sam.q/k/v.p``            N_p x D, dtype       SAM's last block on the valid tokens of part p
``sam.lse.p``              heads x N_p, float32 log-sum-exp of each row over all SAM tokens
``sam.embedding``          1 x 256 x 64 x 64    SAM's image embedding (refinement prompts)
=========================  ===================  =============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from methods.base import Evidence, OvssError
from methods.clipseg.packing import pack_symmetric
from methods.clipseg.proxy import (
    last_values,
    proxy_cells,
    proxy_geometry,
    vision_features,
)
from methods.clipseg.reach import reach
from methods.clipseg.trident import canvas_operators, sam_guidance_pass, sam_image
from methods.clipseg.variants import SECOND
from methods.clipseg.vfm import VisionModel, load_vision, vision_entry
from methods.clipseg.windows import WindowGrid
from methods.deferred import Deferred


def vision_names(settings: Mapping[str, Any]) -> list[str]:
    names = settings.get("vision") or []
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise OvssError(f"clipseg: settings.vision must be a list of vision model names, "
                        f"got {names!r}")
    if len(set(names)) != len(names):
        raise OvssError(f"clipseg: settings.vision names a model twice: {list(names)}")
    return [str(n) for n in names]


def served(settings: Mapping[str, Any]) -> tuple[str, ...]:
    """The second-model variants the settings can serve: proxyclip with ``vision``, trident
    with ``vision`` and ``sam`` (what ``settings.variants`` null adds to the family's)."""
    if not vision_names(settings):
        return ()
    return SECOND if settings.get("sam") else SECOND[:1]


def check_settings(settings: Mapping[str, Any], variants: Sequence[str] = ()) -> None:
    """The vision models named by ``vision`` / ``sam`` exist and are well formed (no weights
    read); Trident's SAM is a SAM; the second-model variants among ``variants`` (what extract
    serves) have what they read."""
    for v in (v for v in variants if v in SECOND and v not in served(settings)):
        need = "settings.vision" if v == "proxyclip" else "settings.vision and settings.sam"
        raise OvssError(f"clipseg: settings.variants lists {v}, which needs {need}")
    for name in vision_names(settings):
        vision_entry(settings, name)
    if settings.get("sam"):
        if vision_entry(settings, str(settings["sam"]))["arch"] != "sam":
            raise OvssError(f"clipseg: settings.sam {settings['sam']!r} is not a SAM "
                            f"(arch: sam)")


def settings_models(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of the models extract runs (for the evidence key)."""
    names = vision_names(settings) + ([str(settings["sam"])] if settings.get("sam") else [])
    return {n: (settings.get("vision_models") or {}).get(n) for n in names}


def load_models(settings: Mapping[str, Any], device: str, deferred: bool = False
                ) -> dict[str, VisionModel | Deferred]:
    """name -> the loaded model (or a :class:`Deferred` builder), for ``vision`` and ``sam``."""
    names = vision_names(settings) + ([str(settings["sam"])] if settings.get("sam") else [])
    out: dict[str, Any] = {}
    for n in dict.fromkeys(names):
        if deferred:
            out[n] = Deferred(lambda n=n: load_vision(settings, n, device))
        else:
            out[n] = load_vision(settings, n, device)
    return out


def sam_head(sam: torch.nn.Module, size: str) -> Evidence:
    """What Trident's decode reads of SAM: the last block's relative position tables and head
    count, and the prompt encoder / mask decoder (refinement), float32 on the CPU."""
    attn = sam.image_encoder.blocks[-1].attn
    if sam.image_encoder.blocks[-1].window_size != 0:
        raise OvssError("clipseg: the last block of Trident's SAM must attend globally")
    t = {"sam.rel_pos_h": attn.rel_pos_h.detach().float().cpu().clone(),
         "sam.rel_pos_w": attn.rel_pos_w.detach().float().cpu().clone()}
    for prefix, mod in (("sam.pe.", sam.prompt_encoder), ("sam.md.", sam.mask_decoder)):
        for k, v in mod.state_dict().items():
            t[prefix + k] = v.detach().float().cpu().clone()
    return Evidence(t, {"sam_heads": int(attn.num_heads), "sam_size": size,
                        "sam_img_size": int(sam.image_encoder.img_size)})


def sam_size(settings: Mapping[str, Any]) -> str:
    spec = vision_entry(settings, str(settings["sam"]))
    return "tiny" if spec.get("tiny") is not None else str(spec.get("size", "vit_b"))


@torch.no_grad()
def second_evidence(seg: Any, models: Mapping[str, VisionModel], image: np.ndarray,
                    windows: torch.Tensor, grid: WindowGrid, family_values: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The evidence of ``proxyclip`` / ``trident`` (module docstring) and its meta."""
    settings = seg.settings
    vision = {n: models[n] for n in vision_names(settings)}
    chunk = max(1, int(settings["chunk"]))
    final = seg.visual.transformer.resblocks[-1].attn.out_proj
    values, feats, kind = [], {n: [] for n in vision}, {}
    for i in range(0, len(windows), chunk):
        part = windows[i:i + chunk]
        v = (family_values[i:i + chunk] if family_values is not None
             else last_values(seg.visual, part.to(seg.device)))
        values.append(final(v[:, 1:].float()).cpu().to(dtype))
        for n, m in vision.items():
            f = vision_features(m, part, seg.mean, seg.std)            # B x P_v x C, unit
            kind[n] = "sim" if stores_similarity(*f.shape[1:]) else "feat"
            if kind[n] == "sim":
                f = pack_symmetric(f @ f.transpose(1, 2))
            feats[n].append(f.to(dtype))
    t = {"proxy.values": torch.cat(values)}
    t.update({f"proxy.{kind[n]}.{n}": torch.cat(f) for n, f in feats.items()})
    t.update(proxy_geometry(vision, grid, image.shape[:2]))
    cells = proxy_cells(vision, grid)
    meta: dict[str, Any] = {"proxy_cells": cells}
    if settings.get("sam"):
        sam = models[str(settings["sam"])].module
        guided = sam_guidance(sam, image, seg.patch, int(settings.get("sam_split") or 1))
        for p, g in enumerate(guided["parts"]):
            for k in ("q", "k", "v"):
                t[f"sam.{k}.{p}"] = g[k].to(dtype)
            t[f"sam.lse.{p}"] = g["lse"]
        t["sam.embedding"] = guided["embedding"].to(dtype)
        parts = [g["grid"] for g in guided["parts"]]
        for n in vision:
            ops = canvas_operators(grid, seg.patch, tuple(cells[n]), parts)
            t[f"trident.rows.{n}"] = ops["rows"]
            for p in range(len(parts)):
                t[f"trident.cols.{n}.{p}"] = ops[f"cols.{p}"]
        meta.update({"sam_parts": parts, "sam_full": guided["parts"][0]["full"],
                     "sam_input_size": guided["input_size"],
                     "sam_original_size": guided["original_size"]})
    return t, meta


def stores_similarity(tokens: int, channels: int) -> bool:
    """Whether the evidence keeps a vision model's S (packed, P_v (P_v + 1) / 2 values: decode
    skips F F^T, P_v^2 C per window) rather than its unit features F (P_v C values): when S is
    at most 1.25 times F's size (DINO ViT-B/8 at 336 px: 1764 tokens x 768 channels keeps S;
    SAM: 4096 x 256 keeps F)."""
    return tokens + 1 <= 2.5 * channels


def sam_guidance(sam: torch.nn.Module, image: np.ndarray, patch: int, split: int
                 ) -> dict[str, Any]:
    """Trident's SAM passes: the image resized to multiples of ``patch``; one pass on it, or
    (``split`` 2, Cityscapes) one on each half plus one on the whole for the refinement's
    embedding."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    img = sam_image(image, patch)
    if split == 2:
        w = img.shape[1]
        parts = [sam_guidance_pass(predictor, np.ascontiguousarray(img[:, :w // 2]), 16),
                 sam_guidance_pass(predictor, np.ascontiguousarray(img[:, w // 2:]), 16)]
        predictor.set_image(img)
        embedding = predictor.features.detach().float().cpu()
    else:
        parts = [sam_guidance_pass(predictor, img, 16)]
        embedding = parts[0]["embedding"]
    return {"parts": parts, "embedding": embedding,
            "input_size": [int(s) for s in predictor.input_size],
            "original_size": [int(s) for s in predictor.original_size]}


def second_logits(seg: Any, ev: Evidence, params: Mapping[str, Any], scale: float
                  ) -> torch.Tensor:
    """``scale * cos`` of every name at the original image size (H x N x W float32) for
    ``proxyclip`` / ``trident``; OvssError when the evidence lacks what the variant reads."""
    from methods.clipseg.proxy import proxy_logits
    from methods.clipseg.trident import trident_logits

    variant = params["attention"]
    if "proxy.values" not in ev.tensors:
        raise OvssError(f"clipseg: attention={variant}: this evidence was extracted for "
                        f"{ev.meta.get('variants')} only (settings.variants, settings.vision)")
    if variant == "proxyclip":
        return proxy_logits(seg.features, ev.tensors, ev.meta, params, scale)
    head = seg.decode_state()
    if "sam_parts" not in ev.meta or "sam.rel_pos_h" not in head.tensors:
        raise OvssError("clipseg: attention trident needs SAM's evidence and decode head "
                        "(settings.sam)")
    return trident_logits(seg.features, ev, params, head.tensors,
                          int(head.meta["sam_heads"]), scale)


def _choices(knob: str, defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
             ) -> list[Any]:
    """The values a search can give ``knob`` (reach.py; an unset knob: None)."""
    return reach(knob, {knob: None, **defaults}, space)


def clip_patch(backbone: Mapping[str, Any]) -> int | None:
    """CLIP's patch size from the backbone entry without loading it (tiny: its config; an
    open_clip name ``ViT-B-16...``: 16), None when the name does not say."""
    import re

    from methods.open_clip_backbone import TINY_DEFAULTS

    if backbone.get("tiny") is not None:
        return int((backbone["tiny"] or {}).get("patch_size", TINY_DEFAULTS["patch_size"]))
    m = re.match(r"ViT-[A-Za-z]+-(\d+)", str(backbone.get("model", "")))
    return int(m.group(1)) if m else None


def check_plan(backbone: Mapping[str, Any], settings: Mapping[str, Any],
               defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]) -> None:
    """What a search's settings and space cannot do together, before Ray (module docstring of
    :mod:`second`): OvssError naming it."""
    check_settings(settings)
    variants = set(_choices("attention", defaults, space))
    if not variants & set(SECOND):
        return
    names = vision_names(settings)
    if not names:
        raise OvssError(f"clipseg: attention {sorted(variants & set(SECOND))} needs a second "
                        f"vision model: list it in settings.vision")
    for v in _choices("vision", defaults, space):
        if v is not None and v not in names:
            raise OvssError(f"clipseg: knob vision={v!r} is not extracted (settings.vision "
                            f"lists {', '.join(names)})")
    patch = clip_patch(backbone)
    window = int(settings.get("window") or 0)
    for n in names:
        vp = int(vision_entry(settings, n).get("patch") or 0)
        padded = window
        if settings.get("pad_to"):
            padded = -(-window // int(settings["pad_to"])) * int(settings["pad_to"])
        elif patch:
            padded = -(-window // patch) * patch
        if vp and window > 0 and vision_entry(settings, n)["arch"] != "sam" and padded % vp:
            raise OvssError(f"clipseg: vision model {n!r} (patch {vp}) cannot take the "
                            f"{padded} px window (settings.window {window}): use a window "
                            f"whose padded size is a multiple of {vp}, or settings.pad_to")
    if "trident" in variants:
        if not settings.get("sam"):
            raise OvssError("clipseg: attention trident needs SAM: name it in settings.sam")
        stride = int(settings.get("stride") or 0)
        if window <= 0 or (patch and (window % patch or stride % patch)):
            raise OvssError(f"clipseg: attention trident slides windows on CLIP's {patch} px "
                            f"grid: settings.window {window} and stride {stride} must be "
                            f"positive multiples of it")
        if patch and settings.get("align") != patch:
            raise OvssError(f"clipseg: attention trident needs settings.align = {patch} (the "
                            f"image resized to multiples of CLIP's patch; protocol trident)")
        if settings.get("pad_to") and window % int(settings["pad_to"]):
            raise OvssError(f"clipseg: attention trident cannot paste windows padded to "
                            f"settings.pad_to {settings['pad_to']}: use a window multiple of it")
