"""``ClipSegSegmenter``: extract once per image (one ViT pass per window), decode per trial.

Evidence of one image (W windows of T = 1 + P tokens, width D, L blocks, K = 4 DSI terms,
N names; ``evidence_dtype`` float16 by default, measured against float32 in the tests). A
variant-specific tensor is stored only when a variant of ``settings.variants`` reads it
(variants.py; null: every variant but scclip):

==================  =============================  ========================================
``key_gram``        (L-1) x W x T(T+1)/2, dtype    upper triangle of k_l k_l^T, blocks 1..L-1
``values``          (K-1) x W x T x D, dtype       DSI's V for dsi_start = -2..-K, times W_o^T
``value_last``      W x T x D, dtype               v_L, raw (per-head variants, dsi_start -1)
``final_keys``      W x T x D, dtype               k_L, raw (naclip per head, kk_last's Gram)
``fixed_cos``       7 x W x P x N, dtype           cosines of the knob-free variants: qk for
                                                   dsi_start -1..-4, clearclip, sclip, maskclip
``sc_*``            scclip.py (``scclip_evidence``) SC-CLIP: X_{L-2} filled, cosine Grams of the
                                                   pre / post layers, pieces of the fused sum
``rows``, ``cols``  H x A gh, W x B gw, float32    separable window upsampling (windows.py)
``text``            N x E, float32                 template-averaged name embeddings
``image``           H' x W' x 3 uint8              the resized image the ViT saw (PAMR's guide)
==================  =============================  ========================================

sclip and maskclip keep the final block's residual and FFN; they have no knob, so their
dense features are finished at extract and only their cosines are kept (x_{L-1} is not stored).
Decode runs no transformer block: it reads ln_post, proj, out_proj (and for scclip the final
block's ln_1 and key / value projections) from the decode head (head.py), which is all a trial
worker decoding cached evidence builds (``from_decode_state``). ``pamr_steps`` > 0 refines the
cosines at the original size with PAMR (methods/pamr.py) before the logit scale, as NACLIP does.
``proxyclip`` and ``trident`` read a second vision model's evidence (second.py), extracted when
``settings.variants`` holds them (null: when ``settings.vision`` / ``sam`` can serve them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image
from methods.clipseg.backbone import TEMPLATES, load_clip, name_embeddings, tiny_model_name
from methods.clipseg.decoding import ClipSegDecode
from methods.clipseg.evidence import clip_evidence
from methods.clipseg.head import (
    HEAD_VERSION,
    decode_head,
    frozen_layer_norm,
    frozen_linear,
    same_head,
)
from methods.clipseg.protocols import (
    PROFILE_KEYS,
    apply_protocol,
    class_prompts,
    knob_defaults,
)
from methods.clipseg.reach import check_scclip_settings, search_settings
from methods.clipseg.sam_refine import decode_sam
from methods.clipseg.scclip import FinalAttention, fused_pieces
from methods.clipseg.second import (
    check_plan,
    check_settings,
    load_models,
    sam_head,
    sam_size,
    second_evidence,
    served,
    settings_models,
)
from methods.clipseg.trident import aligned_size
from methods.clipseg.variants import (
    DSI_TERMS,
    SECOND,
    VARIANTS,
    check_variants,
    stored_tensors,
)
from methods.clipseg.windows import (
    WindowGrid,
    resize_image,
    resized_size,
    separable_upsampling,
    window_batch,
    window_grid,
)
from methods.deferred import Deferred

__all__ = ["VARIANTS", "ClipSegSegmenter"]
SETTINGS: dict[str, Any] = {
    "seed": 0, "protocol": "cra", "dataset": None, "templates": "imagenet80",
    "evidence_dtype": "float16", "chunk": 16, "variants": None, "scclip_layers": None,
    "lof_neighbors": 30, "lof_contamination": 0.05, **{k: None for k in PROFILE_KEYS},
    "vision": [], "vision_models": {}, "sam": None,
}
#: Settings that change extract's output (the rest only change decode).
EXTRACT_SETTINGS = ("short_side", "window", "stride", "templates", "evidence_dtype", "names",
                    "dataset", "background", "variants", "scclip_layers", "lof_neighbors",
                    "lof_contamination", "pad_to", "align", "sam_split", "vision", "sam")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
VERSION = 3


class ClipSegSegmenter(ClipSegDecode, Segmenter):
    """CLIP CRA + DSI (Liu et al., AAAI 2025) on an open_clip ViT."""

    method = "clipseg"

    def __init__(self, model: torch.nn.Module | Deferred, model_name: str,
                 backbone: Mapping[str, Any], settings: Mapping[str, Any], device: str = "cpu",
                 head: Evidence | None = None, vision: Mapping[str, Any] | None = None):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise OvssError(f"clipseg: unknown setting(s) {sorted(unknown)}; "
                            f"known: {sorted(SETTINGS)}")
        self.settings = apply_protocol({**SETTINGS, **settings})
        if self.settings["evidence_dtype"] not in DTYPES:
            raise OvssError(f"clipseg: evidence_dtype must be one of {sorted(DTYPES)}")
        if self.settings["templates"] not in TEMPLATES:
            raise OvssError(f"clipseg: templates must be one of {sorted(TEMPLATES)}")
        check_settings(self.settings)
        self.variants = check_variants(self.settings["variants"], served(self.settings))
        check_settings(self.settings, self.variants)
        self.model_name, self.device = model_name, device
        # name -> second vision model (vfm.VisionModel, or a Deferred builder: extract only)
        self._vision = dict(vision) if vision is not None else load_models(
            self.settings, device, deferred=True)
        self.backbone = {k: backbone[k] for k in ("name", "model", "pretrained", "path", "tiny")
                         if k in backbone}
        # model: the open_clip model, or (from_decode_state) a Deferred builder called on first
        # use: extract and text embeddings. Decode reads only the decode head.
        self._model, self._tokenizer = model, None
        if head is None:
            if isinstance(model, Deferred):
                raise ValueError("clipseg: a deferred model needs its decode head")
            head = self.full_head(model, model_name)
        self._adopt_head(head)
        self._text: dict[tuple, torch.Tensor] = {}

    def _adopt_head(self, head: Evidence) -> None:
        """The parameters decode needs, from a decode head (:func:`decode_head`)."""
        t, m = head.tensors, head.meta
        try:
            if int(m["head_version"]) != HEAD_VERSION or m["model_name"] != self.model_name:
                raise ValueError("head_version / model_name")
            self.num_layers, self.patch = int(m["num_layers"]), int(m["patch"])
            self.heads, eps = int(m["heads"]), float(m["ln_eps"])
            weight, bias = t["out_proj.weight"].float(), t.get("out_proj.bias")
            self.out_proj = frozen_linear(weight, None if bias is None else bias.float())
            self.out_bias = self.out_proj.bias.detach() if bias is not None else None
            self.ln_post = frozen_layer_norm(t["ln_post.weight"].float(),
                                              t["ln_post.bias"].float(), eps)
            self.proj = t["proj"].float()
            dim, kv_bias = self.proj.shape[0], t.get("in_proj_kv.bias")
            kv = t["in_proj_kv.weight"].float()
            self.final_attention = FinalAttention(
                frozen_layer_norm(t["ln_1.weight"].float(), t["ln_1.bias"].float(),
                                  float(m["ln_1_eps"])),
                kv[:dim], None if kv_bias is None else kv_bias[:dim].float(),
                kv[dim:], None if kv_bias is None else kv_bias[dim:].float(),
                self.out_proj, self.heads)
            self.mean = t["image_mean"].float().view(3, 1, 1)
            self.std = t["image_std"].float().view(3, 1, 1)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise OvssError(f"clipseg: the decode head of {self.model_name} is malformed "
                            f"({type(e).__name__}: {e})") from None
        if self.num_layers < DSI_TERMS:
            raise OvssError(f"clipseg: the ViT needs at least {DSI_TERMS} blocks for DSI, "
                            f"{self.model_name} has {self.num_layers}")
        self.scclip_layers = check_scclip_settings(self.settings, self.variants,
                                                   self.num_layers)
        self._head = head

    @classmethod
    def from_spec(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                  device: str = "cpu") -> ClipSegSegmenter:
        model, name = load_clip(backbone, int(settings.get("seed", 0)), device)
        vision = load_models(apply_protocol({**SETTINGS, **settings}), device)
        return cls(model, name, backbone, settings, device, vision=vision)

    @classmethod
    def from_decode_state(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                          state: Evidence, device: str = "cpu") -> ClipSegSegmenter:
        """A segmenter that decodes from ``state`` (:meth:`decode_state` of a segmenter of the
        same backbone and settings) without building the model; extract and text embeddings
        build it (:func:`load_clip`) on first use. OvssError if ``state`` is malformed or names
        another model than ``backbone``."""
        spec, seed = dict(backbone), int(settings.get("seed", 0))
        name = (tiny_model_name(dict(spec["tiny"] or {}), register=False)
                if spec.get("tiny") is not None
                else str(spec.get("model")))
        return cls(Deferred(lambda: load_clip(spec, seed, device)), name, backbone, settings,
                   device, head=state)

    def decode_state(self) -> Evidence:
        """The decode head: everything decode reads from the model (see :func:`decode_head`;
        with ``settings.sam`` also SAM's share, :func:`second.sam_head`)."""
        return self._head

    def full_head(self, model: torch.nn.Module, name: str) -> Evidence:
        head = decode_head(model, name)
        if self.settings["sam"]:
            head = head.merged(sam_head(self.vision(str(self.settings["sam"])).module,
                                        sam_size(self.settings)))
        return head

    def vision(self, name: str) -> Any:
        """The second vision model ``name`` (built on first use)."""
        if isinstance(self._vision[name], Deferred):
            self._vision[name] = self._vision[name].build()
        return self._vision[name]

    def refine_sam(self) -> torch.nn.Module:
        """SAM's prompt encoder and mask decoder from the decode head (Trident's refinement)."""
        if getattr(self, "_refine_sam", None) is None:
            self._refine_sam = decode_sam(self._head)
        return self._refine_sam

    @classmethod
    def knob_defaults(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The protocol's trial-0 knob values (protocols.KNOBS) and the first vision model."""
        return knob_defaults(apply_protocol({**SETTINGS, **settings}))


    @classmethod
    def search_settings(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                        defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, Any]:
        """The variants and SC-CLIP layers a search over ``space`` can reach (reach.py), and
        what the second vision models cannot do with these settings (second.check_plan)."""
        out = search_settings(backbone, settings, defaults, space)
        check_plan(backbone, apply_protocol({**SETTINGS, **out}), defaults, space)
        return out

    @property
    def model(self) -> torch.nn.Module:
        """The open_clip model, built on first use; it must match the decode head."""
        if isinstance(self._model, Deferred):
            model, name = self._model.build()
            if not same_head(self.full_head(model, name), self._head):
                raise OvssError(f"clipseg: the cached decode head does not match the weights "
                                f"of {name} (clear the evidence cache)")
            self._model = model
        return self._model

    @property
    def model_built(self) -> bool:
        return not isinstance(self._model, Deferred)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    def settings_key(self) -> dict[str, Any]:
        key = {k: self.settings[k] for k in EXTRACT_SETTINGS}
        key["vision_models"] = settings_models(self.settings)
        if "tiny" in self.backbone:
            key["seed"] = self.settings["seed"]
        return {"method": self.method, "version": VERSION, "backbone": self.backbone, **key}

    # --- text ----------------------------------------------------------------------------------
    def background_mode(self, classes: ClassSet) -> str:
        """``none`` (no background class), ``query`` (class 0 embedded from its names, the
        family's rule) or ``threshold`` (our rule: no background text)."""
        if not classes.background:
            return "none"
        return "query" if self.settings["background"] == "query" else "threshold"

    def class_names(self, classes: ClassSet) -> tuple[list[str], list[int]]:
        """The names to embed and, per name, the index of its class among the predicted
        classes: every class with ``query`` background, else the foreground ones (label value
        minus 1 with a background class). Names as the protocol lists them (protocols.py)."""
        prompts = class_prompts(self.settings, classes.names, classes.prompts)
        first = 0 if self.background_mode(classes) in ("query", "none") else 1
        names, owner = [], []
        for j, c in enumerate(range(first, len(classes.names))):
            for p in prompts[c]:
                names.append(p)
                owner.append(j)
        return names, owner

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """names x E float32, memoised per (names, templates): they depend on nothing else."""
        key = (tuple(names), self.settings["templates"])
        if key not in self._text:
            self._text[key] = name_embeddings(self.model, self.tokenizer, names,
                                              self.settings["templates"])
        return self._text[key]

    # --- extract -------------------------------------------------------------------------------
    def resized(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> H'xW'x3 uint8, the short side resized (windows.py)."""
        return resize_image(image, resized_size(*image.shape[:2],
                                                int(self.settings["short_side"])))

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> 3 x H x W float32 with the model's mean and std."""
        img = torch.from_numpy(np.ascontiguousarray(image))
        return (img.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> normalised 3 x H' x W' float32 (short side resized; with ``align``
        resized again to multiples of it, at least the window: Trident)."""
        small = self.resized(image)
        pixels = self.normalise(small)
        if self.settings["align"]:
            size = small.shape[:2]
            new = aligned_size(*size, int(self.settings["align"]), int(self.settings["window"]))
            if new != size:
                pixels = F.interpolate(pixels[None], size=new, mode="bilinear",
                                       align_corners=False)[0]
        return pixels

    def geometry(self, size: tuple[int, int]) -> tuple[int, int]:
        """(window, stride) in px for a resized image; window 0 = the whole image."""
        window, stride = int(self.settings["window"]), int(self.settings["stride"])
        if window <= 0:
            return max(size), max(size)
        return window, stride

    def window_grid(self, size: tuple[int, int]) -> WindowGrid:
        return window_grid(size, *self.geometry(size), self.patch, self.settings["pad_to"])

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Block output rows (... x D) -> unit-norm dense features (... x E) float32."""
        return F.normalize(self.ln_post(z.float().cpu()) @ self.proj, dim=-1)

    @torch.no_grad()
    def extract(self, image: np.ndarray, classes: ClassSet,
                present: Sequence[int] | None = None) -> Evidence:
        """One ViT pass per window (and the second vision models' passes); ``present`` is not
        used (no presence rule in this method)."""
        image = check_image(image)
        names, owner = self.class_names(classes)
        text = self.text_embeddings(names)
        pixels = self.preprocess(image)
        grid = self.window_grid(tuple(pixels.shape[1:]))
        windows = window_batch(pixels, grid)
        dtype = DTYPES[self.settings["evidence_dtype"]]
        keep = stored_tensors(self.variants)
        scclip = "scclip" in self.variants
        second = bool(set(self.variants) & set(SECOND))
        tensors, v_last = {}, None
        if keep or scclip:
            tensors, v_last = clip_evidence(self, windows, grid, text, dtype, keep, scclip,
                                            second)
        meta = {"background": classes.background, "bg_mode": self.background_mode(classes),
                "num_classes": len(classes.names), "name_class": owner,
                "image_size": list(image.shape[:2]),
                "grid": [len(grid.ys), len(grid.xs), grid.gh, grid.gw],
                "tokens": 1 + grid.gh * grid.gw, "layers": self.num_layers,
                "variants": list(self.variants)}
        if second:
            models = {n: self.vision(n) for n in self._vision}
            extra, extra_meta = second_evidence(self, models, image, windows, grid, v_last,
                                                dtype)
            tensors.update(extra)
            meta.update(extra_meta)
        rows, cols = separable_upsampling(grid, image.shape[:2])
        tensors.update({"rows": rows, "cols": cols, "text": text.clone(),
                        "image": torch.from_numpy(np.ascontiguousarray(self.resized(image)))})
        if scclip:
            meta["sc_layers"] = self.scclip_layers
            meta["sc_pieces"] = [list(p) for p in fused_pieces(
                tuple(self.scclip_layers["start"]), tuple(self.scclip_layers["end"]))]
        return Evidence(tensors, meta)
