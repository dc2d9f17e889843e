"""The ``attention`` variants of clipseg: which evidence tensors each reads, its knob checks, and
how it turns evidence into window cosines (decode's only variant-specific step).

==============================  ===========================================================
variant                         evidence it reads (segmenter.py's table) and decode
==============================  ===========================================================
``qk``, ``clearclip``,          ``fixed_cos``: finished at extract (no knob but qk's
``sclip``, ``maskclip``         dsi_start)
``kk_last``                     ``final_keys`` (its Gram), ``values`` / ``value_last``
``kk_mid``, ``cra``             ``key_gram`` (layer M), ``values`` / ``value_last``
``naclip``                      ``final_keys``, ``value_last``: per-head attention at decode
``scclip``                      ``sc_*`` (scclip.py): the final block's attention at decode
``proxyclip``                   ``proxy.*`` (second.py): proxy.proxy_logits
``trident``                     ``proxy.*``, ``trident.*``, ``sam.*``: trident.trident_logits
                                (+ sam_refine.py)
==============================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from methods.base import Evidence, OvssError
from methods.clipseg.family import attend, fixed_outputs, naclip_probs, self_attention
from methods.clipseg.formulas import (
    coherence_residual_attention,
    dense_output,
    integrated_value,
    key_gram,
    relation_attention,
)
from methods.clipseg.packing import pack_symmetric, unpack_symmetric
from methods.clipseg.scclip import scclip_output
from methods.pamr import parse_dilations

#: CRA paper Table 4 rows, then the family's final blocks (family.py).
FAMILY = ("qk", "kk_last", "kk_mid", "cra", "clearclip", "sclip", "naclip", "maskclip")
#: The variants that read CLIP alone: the family, then SC-CLIP.
CLIP_VARIANTS = (*FAMILY, "scclip")
#: The variants that read a second vision model (second.py, docs/frontier.md).
SECOND = ("proxyclip", "trident")
VARIANTS = (*CLIP_VARIANTS, *SECOND)
#: What extract stores with ``settings.variants`` null: the family's variants (scclip's evidence,
#: X_0..X_{L-2} sums and Grams, is as large as all the others' together).
DEFAULT_VARIANTS = FAMILY
#: Rows of ``fixed_cos``: qk for dsi_start -1..-4, then the knob-free family blocks.
FIXED = ("qk-1", "qk-2", "qk-3", "qk-4", "clearclip", "sclip", "maskclip")
DSI_TERMS = 4
_SCCLIP = ("sc_x", "sc_cls", "sc_gram_pre", "sc_gram_post", "sc_fuse", "sc_flags")
#: The evidence tensors each variant reads (all of them also read rows, cols, text, image).
NEEDS: dict[str, tuple[str, ...]] = {
    "qk": ("fixed_cos",), "clearclip": ("fixed_cos",), "sclip": ("fixed_cos",),
    "maskclip": ("fixed_cos",), "kk_last": ("final_keys", "values", "value_last"),
    "kk_mid": ("key_gram", "values", "value_last"), "cra": ("key_gram", "values", "value_last"),
    "naclip": ("final_keys", "value_last"), "scclip": _SCCLIP,
    "proxyclip": (), "trident": (),     # their own tensors (second.py)
}


def stored_tensors(variants: Collection[str]) -> set[str]:
    """The variant-specific evidence tensors extract stores for ``variants``."""
    return {k for v in variants for k in NEEDS[v]}


def check_variants(variants: Any, second: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``settings.variants``: null (:data:`DEFAULT_VARIANTS` and ``second``: the second-model
    variants the settings can serve, second.py) or a list of known variants."""
    if variants is None:
        return (*DEFAULT_VARIANTS, *second)
    if isinstance(variants, str) or not isinstance(variants, (list, tuple)) or not variants:
        raise OvssError(f"clipseg: settings.variants must be null or a non-empty list of "
                        f"{list(VARIANTS)}, got {variants!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise OvssError(f"clipseg: settings.variants has unknown variant(s) {unknown}; "
                        f"choose from {list(VARIANTS)}")
    return tuple(v for v in VARIANTS if v in variants)


def fixed_window_outputs(ev: Any, final: torch.nn.Module) -> list[torch.Tensor]:
    """The knob-free blocks' outputs for the patch rows of a window pass (``vit.window_pass``;
    W x P x D each, in :data:`FIXED` order): CLIP's own per-head qk attention on V for
    dsi_start -1..-4, then clearclip, sclip, maskclip (family.py)."""
    qk = self_attention(ev.q, ev.k, final.attn.num_heads)[:, :, 1:]    # patch rows, per head
    outs = [attend(qk, integrated_value(ev.terms, -n), final.attn.out_proj)
            for n in range(1, DSI_TERMS + 1)]
    return outs + [z[:, 1:] for z in fixed_outputs(final, ev.x, ev.q, ev.k,
                                                   ev.terms[0]).values()]


def window_tensors(ev: Any, final: torch.nn.Module,
                   cosines: Callable[[torch.Tensor], torch.Tensor],
                   keep: Collection[str]) -> dict[str, torch.Tensor]:
    """The evidence tensors in ``keep`` of a window pass (``vit.window_pass``), float32.
    ``cosines``: block output rows (W x P x D) -> cosines with the names (W x P x N)."""
    out: dict[str, torch.Tensor] = {}
    if "key_gram" in keep:
        out["key_gram"] = pack_symmetric(ev.grams)
    if "values" in keep:                                    # V for dsi_start = -n, times W_o^T
        w_o = final.attn.out_proj.weight.float()
        out["values"] = torch.stack([integrated_value(ev.terms, -n) @ w_o.T
                                     for n in range(2, DSI_TERMS + 1)])
    if "value_last" in keep:
        out["value_last"] = ev.terms[0]
    if "final_keys" in keep:
        out["final_keys"] = ev.k
    if "fixed_cos" in keep:
        out["fixed_cos"] = torch.stack([cosines(z) for z in fixed_window_outputs(ev, final)])
    return out


def check_params(params: Mapping[str, Any], layers: int) -> None:
    """The knobs decode reads, before any work: OvssError naming the knob."""
    variant = params["attention"]
    if variant not in VARIANTS:
        raise OvssError(f"clipseg: attention must be one of {VARIANTS}, got {variant!r}")
    if variant in ("kk_mid", "cra") and not 1 <= int(params["layer"]) <= layers - 1:
        raise OvssError(f"clipseg: layer must be in 1..{layers - 1} (1-based block index), "
                        f"got {params['layer']}")
    if variant in ("qk", "kk_last", "kk_mid", "cra") and not (
            -DSI_TERMS <= int(params["dsi_start"]) <= -1):
        raise OvssError(f"clipseg: dsi_start must be in -{DSI_TERMS}..-1, "
                        f"got {params['dsi_start']}")
    if variant == "naclip" and not float(params["gaussian_std"]) > 0:
        raise OvssError(f"clipseg: gaussian_std must be > 0, got {params['gaussian_std']}")
    if int(params["pamr_steps"]) < 0:
        raise OvssError(f"clipseg: pamr_steps must be 0 (off) or more, got {params['pamr_steps']}")
    if int(params["pamr_steps"]) > 0:
        parse_dilations(params["pamr_dilations"])


def attention_probs(seg: Any, ev: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
    """softmax(Attn) for the patch rows, one map for all heads: W x P x T float32
    (Eq. 3 and the kk variants)."""
    variant = params["attention"]
    t = int(ev.meta["tokens"])
    if variant == "kk_last":
        gram = key_gram(ev.tensors["final_keys"])[:, 1:]
    else:
        gram = unpack_symmetric(ev.tensors["key_gram"][int(params["layer"]) - 1], t)[:, 1:]
    relation = None
    if variant == "cra":
        g = relation_attention(gram[:, :, 1:], float(params["epsilon"]), int(params["min_pts"]))
        relation = F.pad(g, (1, 0))                  # the class token column: no relation
    return torch.softmax(coherence_residual_attention(gram, float(params["tau"]), relation),
                         dim=-1)


def window_cosines(seg: Any, ev: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
    """Cosine of every patch with every name: W x P x N float32. ``seg``: the segmenter (its
    decode head: ``out_proj``, ``heads``, ``final_attention``, ``features``)."""
    variant = params["attention"]
    missing = [k for k in NEEDS[variant] if k not in ev.tensors]
    if missing:
        raise OvssError(f"clipseg: attention={variant}: this evidence was extracted for "
                        f"{ev.meta.get('variants')} only (settings.variants)")
    if variant == "qk":
        return ev.tensors["fixed_cos"][-int(params["dsi_start"]) - 1].float()
    if variant in FIXED:
        return ev.tensors["fixed_cos"][FIXED.index(variant)].float()
    if variant == "scclip":
        z = scclip_output(ev.tensors, ev.meta, params, seg.final_attention)
    elif variant == "naclip":
        gh, gw = ev.meta["grid"][2:]
        probs = naclip_probs(ev.tensors["final_keys"], seg.heads, (gh, gw),
                             float(params["gaussian_std"]))
        z = attend(probs, ev.tensors["value_last"], seg.out_proj)
    else:
        attn = attention_probs(seg, ev, params)
        dsi = -int(params["dsi_start"])
        if dsi == 1:   # Proj(A v_L) = (A v_L) W_o^T + b_o
            z = seg.out_proj(attn @ ev.tensors["value_last"].float())
        else:
            z = dense_output(attn, ev.tensors["values"][dsi - 2], out_bias=seg.out_bias,
                             probabilities=True)
    return seg.features(z) @ ev.tensors["text"].float().T
