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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image
from methods.clipseg.backbone import TEMPLATES, load_clip, name_embeddings, tiny_model_name
from methods.clipseg.head import (
    HEAD_VERSION,
    decode_head,
    frozen_layer_norm,
    frozen_linear,
    same_head,
)
from methods.clipseg.labels import labels_from_probs, names_to_classes, upsample
from methods.clipseg.protocols import PROFILE_KEYS, apply_protocol, class_prompts
from methods.clipseg.reach import check_scclip_settings, search_settings
from methods.clipseg.scclip import FinalAttention, fused_pieces, scclip_evidence
from methods.clipseg.variants import (
    DSI_TERMS,
    VARIANTS,
    check_params,
    check_variants,
    stored_tensors,
    window_cosines,
    window_tensors,
)
from methods.clipseg.vit import window_pass
from methods.clipseg.windows import (
    mosaic,
    resize_image,
    resized_size,
    separable_upsampling,
    window_batch,
    window_grid,
)
from methods.deferred import Deferred
from methods.pamr import pamr, parse_dilations

__all__ = ["VARIANTS", "ClipSegSegmenter"]
SETTINGS: dict[str, Any] = {
    "seed": 0, "protocol": "cra", "dataset": None, "templates": "imagenet80",
    "evidence_dtype": "float16", "chunk": 16, "variants": None, "scclip_layers": None,
    "lof_neighbors": 30, "lof_contamination": 0.05, **{k: None for k in PROFILE_KEYS},
}
#: Settings that change extract's output (the rest only change decode).
EXTRACT_SETTINGS = ("short_side", "window", "stride", "templates", "evidence_dtype", "names",
                    "dataset", "background", "variants", "scclip_layers", "lof_neighbors",
                    "lof_contamination")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
VERSION = 3


class ClipSegSegmenter(Segmenter):
    """CLIP CRA + DSI (Liu et al., AAAI 2025) on an open_clip ViT."""

    method = "clipseg"

    def __init__(self, model: torch.nn.Module | Deferred, model_name: str,
                 backbone: Mapping[str, Any], settings: Mapping[str, Any], device: str = "cpu",
                 head: Evidence | None = None):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise OvssError(f"clipseg: unknown setting(s) {sorted(unknown)}; "
                            f"known: {sorted(SETTINGS)}")
        self.settings = apply_protocol({**SETTINGS, **settings})
        if self.settings["evidence_dtype"] not in DTYPES:
            raise OvssError(f"clipseg: evidence_dtype must be one of {sorted(DTYPES)}")
        if self.settings["templates"] not in TEMPLATES:
            raise OvssError(f"clipseg: templates must be one of {sorted(TEMPLATES)}")
        self.variants = check_variants(self.settings["variants"])
        self.model_name, self.device = model_name, device
        self.backbone = {k: backbone[k] for k in ("name", "model", "pretrained", "path", "tiny")
                         if k in backbone}
        # model: the open_clip model, or (from_decode_state) a Deferred builder called on first
        # use: extract and text embeddings. Decode reads only the decode head.
        self._model, self._tokenizer = model, None
        if head is None:
            if isinstance(model, Deferred):
                raise ValueError("clipseg: a deferred model needs its decode head")
            head = decode_head(model, model_name)
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
        return cls(model, name, backbone, settings, device)

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
        """The decode head: everything decode reads from the model (see :func:`decode_head`)."""
        return self._head

    @classmethod
    def search_settings(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                        defaults: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, Any]:
        """The variants and SC-CLIP layers a search over ``space`` can reach (reach.py)."""
        return search_settings(backbone, settings, defaults, space)

    @property
    def model(self) -> torch.nn.Module:
        """The open_clip model, built on first use; it must match the decode head."""
        if isinstance(self._model, Deferred):
            model, name = self._model.build()
            if not same_head(decode_head(model, name), self._head):
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
        """HxWx3 uint8 -> normalised 3 x H' x W' float32 (short side resized)."""
        return self.normalise(self.resized(image))

    def geometry(self, size: tuple[int, int]) -> tuple[int, int]:
        """(window, stride) in px for a resized image; window 0 = the whole image."""
        window, stride = int(self.settings["window"]), int(self.settings["stride"])
        if window <= 0:
            return max(size), max(size)
        return window, stride

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Block output rows (... x D) -> unit-norm dense features (... x E) float32."""
        return F.normalize(self.ln_post(z.float().cpu()) @ self.proj, dim=-1)

    @torch.no_grad()
    def extract(self, image: np.ndarray, classes: ClassSet,
                present: Sequence[int] | None = None) -> Evidence:
        """One ViT pass per window; ``present`` is not used (no presence rule in this method)."""
        image = check_image(image)
        names, owner = self.class_names(classes)
        text = self.text_embeddings(names)
        small = self.resized(image)
        pixels = self.normalise(small)
        size = tuple(pixels.shape[1:])
        grid = window_grid(size, *self.geometry(size), self.patch)
        windows = window_batch(pixels, grid)
        dtype = DTYPES[self.settings["evidence_dtype"]]
        final = self.visual.transformer.resblocks[-1]
        keep = stored_tensors(self.variants)
        scclip = "scclip" in self.variants
        parts: dict[str, list[torch.Tensor]] = {}
        chunk = max(1, int(self.settings["chunk"]))
        for i in range(0, len(windows), chunk):
            ev = window_pass(self.visual, windows[i:i + chunk].to(self.device), DSI_TERMS,
                             keep_stream=scclip)
            out = window_tensors(ev, final, lambda z: self.features(z) @ text.T, keep)
            if scclip:
                out.update(scclip_evidence(ev.stream, (grid.gh, grid.gw), self.scclip_layers,
                                           int(self.settings["lof_neighbors"]),
                                           float(self.settings["lof_contamination"])))
            for key, t in out.items():
                parts.setdefault(key, []).append(t.to(torch.uint8 if key == "sc_flags"
                                                      else dtype).cpu())
        rows, cols = separable_upsampling(grid, image.shape[:2])
        batch_dim = {"key_gram": 1, "values": 1, "fixed_cos": 1, "sc_gram_pre": 1,
                     "sc_gram_post": 1, "sc_fuse": 1}
        tensors = {k: torch.cat(v, batch_dim.get(k, 0)).contiguous() for k, v in parts.items()}
        tensors.update({"rows": rows, "cols": cols, "text": text.clone(),
                        "image": torch.from_numpy(np.ascontiguousarray(small))})
        meta = {"background": classes.background, "bg_mode": self.background_mode(classes),
                "num_classes": len(classes.names), "name_class": owner,
                "image_size": list(image.shape[:2]),
                "grid": [len(grid.ys), len(grid.xs), grid.gh, grid.gw],
                "tokens": 1 + grid.gh * grid.gw, "layers": self.num_layers,
                "variants": list(self.variants)}
        if scclip:
            meta["sc_layers"] = self.scclip_layers
            meta["sc_pieces"] = [list(p) for p in fused_pieces(
                tuple(self.scclip_layers["start"]), tuple(self.scclip_layers["end"]))]
        return Evidence(tensors, meta)

    # --- decode --------------------------------------------------------------------------------
    def check_params(self, params: Mapping[str, Any], layers: int) -> None:
        check_params(params, layers)

    def window_cosines(self, ev: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """Cosine of every patch with every name: W x P x N float32 (variants.py)."""
        return window_cosines(self, ev, params)

    def guide_image(self, evidence: Evidence) -> torch.Tensor:
        """PAMR's image, as NACLIP builds it: the normalised network input resized (bilinear)
        to the original size. 3 x H x W float32."""
        pixels = self.normalise(evidence.tensors["image"].numpy())
        return F.interpolate(pixels[None], size=tuple(evidence.meta["image_size"]),
                             mode="bilinear", align_corners=False)[0]

    def scaled_logits(self, evidence: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """``logit_scale * cos`` of every name at the original image size: H x N x W
        float32 (this layout makes both upsampling products plain matrix products)."""
        meta = evidence.meta
        self.check_params(params, int(meta["layers"]))
        scale, steps = float(self.settings["logit_scale"]), int(params["pamr_steps"])
        cos = self.window_cosines(evidence, params)
        if steps == 0:
            x = mosaic(cos * scale, *meta["grid"])                         # N x Agh x Bgw
            return upsample(x, evidence.tensors["rows"], evidence.tensors["cols"])
        x = upsample(mosaic(cos, *meta["grid"]), evidence.tensors["rows"],
                     evidence.tensors["cols"]).permute(1, 0, 2)              # N x H x W
        x = pamr(self.guide_image(evidence), x, steps, parse_dilations(params["pamr_dilations"]))
        return x.mul_(scale).permute(1, 0, 2)

    def threshold(self, params: Mapping[str, Any]) -> float:
        """The background probability threshold: the protocol's ``prob_threshold`` when it
        fixes one, else the knob ``bg_threshold``."""
        fixed = self.settings["prob_threshold"]
        return float(params["bg_threshold"] if fixed is None else fixed)

    @torch.no_grad()
    def decode_probs(self, evidence: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """Per-class probabilities at the original image size: C x H x W float32 (the
        predicted classes: all with ``query`` background, else the foreground ones; max over
        each class's names of the softmax over names)."""
        probs = torch.softmax(self.scaled_logits(evidence, params), dim=1).permute(1, 0, 2)
        return names_to_classes(probs, evidence.meta["name_class"])

    @torch.no_grad()
    def decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        """HxW int64 label map in [0, num_classes).

        ``threshold``: the class of the best name, background (0) where the best class
        probability is below the threshold; same result as ``probs_to_labels(decode_probs)``
        without the full softmax (the best probability is ``1 / sum_n exp(l_n - l_max)``).
        ``query``: class 0 competes through its names; SCLIP's area rule when set.
        """
        meta = evidence.meta
        mode = meta.get("bg_mode", "threshold" if meta["background"] else "none")
        area = self.settings["area_threshold"]
        if mode == "query" and area is not None:
            return labels_from_probs(self.decode_probs(evidence, params), mode,
                                     self.threshold(params), area)
        logits = self.scaled_logits(evidence, params)                      # H x N x W
        best, arg = logits.max(1)
        label = torch.as_tensor(meta["name_class"], dtype=torch.long)[arg]
        if mode != "none":
            # best probability < threshold  <=>  sum_n exp(l_n - l_max) > 1 / threshold
            mass = logits.sub_(best[:, None]).exp_().sum(1)
            if mode == "threshold":
                label = label + 1
            label = label.masked_fill_(mass * self.threshold(params) > 1.0, 0)
        return label.numpy().astype(np.int64)
