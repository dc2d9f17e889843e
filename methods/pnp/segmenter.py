"""``PnPSegmenter``: extract once (every layer and head), extend per drop chain, decode per trial.

Evidence of one image (L cross-attention layers, H heads, K classes in the prompt, P x P patches;
``evidence_dtype`` float16 by default: each map is stored divided by its maximum, with the
maxima in float32, so the relative error is that of float16, about 5e-4):

================  ======================  ===================================================
``maps``          L x H x K x P x P       class salience of the first pass (no patch dropped),
                                          every (layer, head): steps 2-3
``maps_scale``    L x H x K, float32      the per-map maxima (float16 storage only)
``salience``      L x H x P x P, float32  U^(0): the class-agnostic salience the first drop
                                          of every (layer, head) chain ranks patches by
``rgb``           h x w x 3, uint8        the image at the working size (for the CRF)
================  ======================  ===================================================

``extend`` (knobs ``layer``, ``head``, ``drop_iters`` D) runs the Salience DropOut chain of that
(layer, head): D - 1 further passes on the image with the selected patches blacked out, each
backpropagating only to that layer. It returns ``chain`` ((D-1) x K x P x P float32, maps with
the dropped patches zeroed) and ``dropped`` ((D-1) x P x P uint8, the patches dropped before each
pass). ``decode`` (knobs ``threshold``, ``sigma``, ``crf`` and the three above) sums the maps
(2 M~0 + M~1 + ...), thresholds, upsamples, blurs, runs the CRF and takes the argmax; no model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image
from methods.deferred import Deferred
from methods.pnp.backbone import VisionLanguageModel, check_vlm_spec, load_vlm
from methods.pnp.formulas import (
    aggregated_salience,
    class_salience,
    drop_patches,
    dropout_aggregate,
    dropout_masked_map,
    gradcam_attention,
    relative_threshold,
    salience_dropout_selection,
)
from methods.pnp.postprocess import channels_to_labels, resize_nearest
from methods.pnp.presence import PresenceFilter, build_presence_filter
from methods.pnp.settings import EXTRACT_SETTINGS, VERSION, checked_settings
from methods.pnp.text import Prompt, build_prompt, check_prompt_names

log = logging.getLogger(__name__)
_WARNED_NO_ENC: set[str] = set()


def warn_no_enc_token(backbone: str) -> None:
    """Say once per process and backbone, loudly, that ITM runs on ``[CLS]``, not ``[ENC]``."""
    if backbone in _WARNED_NO_ENC:
        return
    _WARNED_NO_ENC.add(backbone)
    msg = (f"pnp backbone {backbone!r}: the tokenizer has no [ENC] token, so the ITM text starts "
           f"with [CLS] (the original BLIP / the reference code use [ENC]); maps and scores "
           f"differ from the reference. Set settings.enc_token=false to silence this, or use a "
           f"tokenizer with [ENC] (docs/pnp.md)")
    warnings.warn(msg, UserWarning, stacklevel=3)
    log.warning(msg)


class PnPSegmenter(Segmenter):
    """PnP-OVSS (Luo et al., CVPR 2024) on a BLIP or BridgeTower ITM model."""

    method = "pnp"
    extraction_knobs = ("layer", "head", "drop_iters")

    def __init__(self, vlm: VisionLanguageModel | Deferred, backbone: Mapping[str, Any],
                 settings: Mapping[str, Any], device: str = "cpu"):
        self.settings, self.device = checked_settings(settings), device
        self.backbone = {k: backbone[k] for k in ("name", "arch", "model", "path", "tiny")
                         if k in backbone}
        self._presence: PresenceFilter | None = None
        # vlm: the model, or a Deferred builder (from_spec) called on first use (extract and
        # extend only): a trial worker decoding cached evidence never builds it. Decode reads
        # evidence and settings only (layers, heads, grid come in the evidence's meta).
        self._vlm = vlm
        if not isinstance(vlm, Deferred):
            self._adopt(vlm)

    def _adopt(self, vlm: VisionLanguageModel) -> None:
        """The checks that need the model; warns once when BLIP has no [ENC]."""
        self.check_patch(vlm.patch)
        s = self.settings
        if s["enc_token"] and vlm.arch == "blip" and vlm.enc_token_id is None:
            warn_no_enc_token(str(self.backbone.get("name", "?")))

    def check_patch(self, patch: int) -> None:
        if int(self.settings["image_size"]) % patch:
            raise OvssError(f"pnp: settings.image_size {self.settings['image_size']} is not a "
                            f"multiple of the patch size {patch}")

    @classmethod
    def from_spec(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                  device: str = "cpu") -> PnPSegmenter:
        """Checks the backbone entry and the settings; the model is built on first use."""
        patch = check_vlm_spec(backbone)               # cheap checks first: arch, paths, tiny
        seed = int(settings.get("seed", 0))
        spec = dict(backbone)
        seg = cls(Deferred(lambda: load_vlm(spec, seed, device)), backbone, settings, device)
        if patch is not None:
            seg.check_patch(patch)
        return seg

    @property
    def vlm(self) -> VisionLanguageModel:
        """The ITM model, built (and checked) on first use."""
        if isinstance(self._vlm, Deferred):
            vlm = self._vlm.build()
            self._adopt(vlm)
            self._vlm = vlm
        return self._vlm

    @property
    def vlm_built(self) -> bool:
        return not isinstance(self._vlm, Deferred)

    @property
    def grid(self) -> int:
        """P: patches per side of the model input."""
        return int(self.settings["image_size"]) // self.vlm.patch

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.vlm.mean, dtype=torch.float32).view(3, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.vlm.std, dtype=torch.float32).view(3, 1, 1)

    def settings_key(self) -> dict[str, Any]:
        key = {k: self.settings[k] for k in EXTRACT_SETTINGS}
        if "tiny" in self.backbone or self.settings["presence_model"] == "tiny":
            key["seed"] = self.settings["seed"]
        return {"method": self.method, "version": VERSION, "backbone": self.backbone, **key}

    # --- classes and prompt --------------------------------------------------------------------
    @property
    def presence_filter(self) -> PresenceFilter:
        """The class-presence rule used when ``present`` is None (pluggable: assign to it)."""
        if self._presence is None:
            self._presence = build_presence_filter(self.settings, self.device)
        return self._presence

    @presence_filter.setter
    def presence_filter(self, f: PresenceFilter) -> None:
        self._presence = f

    def present_classes(self, image: np.ndarray, classes: ClassSet,
                        present: Sequence[int] | None) -> list[int]:
        """The foreground label values put in the prompt, ascending: ``present`` (image-level
        labels, background dropped), or the presence filter's when None (or when it leaves no
        class and the class set has no background to fall back on)."""
        fg = set(classes.foreground)
        if present is not None:
            chosen = sorted({int(c) for c in present} & fg)
            if chosen or classes.background:
                return chosen
        return sorted({int(c) for c in self.presence_filter(image, classes)} & fg)

    def prompt_labels(self, classes: ClassSet, labels: Sequence[int]) -> list[int]:
        """The label values the prompt lists: ``labels`` (``prompt_classes: present``) or every
        foreground class (``all``)."""
        if self.settings["prompt_classes"] == "all" and labels:
            return list(classes.foreground)
        return list(labels)

    def picked(self, classes: ClassSet, labels: Sequence[int]) -> tuple[Prompt, list[int]]:
        """The prompt and, for each of ``labels``, its class index in the prompt."""
        listed = self.prompt_labels(classes, labels)
        return self.prompt(classes, listed), [listed.index(c) for c in labels]

    @classmethod
    def check_classes(cls, settings: Mapping[str, Any], classes: ClassSet) -> None:
        """No two foreground classes share a prompt name (see text.check_prompt_names)."""
        check_prompt_names(checked_settings(settings), classes, classes.foreground)

    def prompt(self, classes: ClassSet, labels: Sequence[int]) -> Prompt:
        names = check_prompt_names(self.settings, classes, labels)
        enc = self.vlm.enc_token_id if self.settings["enc_token"] else None
        return build_prompt(self.vlm.tokenizer, names, self.settings["prompt_prefix"], enc)

    # --- the model pass ------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> ``[1, 3, S, S]`` float32: bicubic resize to S x S (no aspect
        preservation, as the reference), scaled to [0, 1], normalised with the model's mean/std."""
        s = int(self.settings["image_size"])
        img = np.array(Image.fromarray(image).resize((s, s), Image.BICUBIC))
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        return ((x - self.mean) / self.std)[None]

    def fill_value(self) -> torch.Tensor:
        """Normalised value of dropped pixels: 0 (the mean colour, the reference) or black."""
        if self.settings["drop_fill"] == "mean":
            return torch.zeros(3)
        return (-self.mean / self.std).flatten()

    def gradcam_pass(self, pixels: torch.Tensor, prompt: Prompt,
                     layers: Sequence[int]) -> torch.Tensor:
        """One forward and one backward: G (step 3) of the 0-based ``layers``, every head,
        ``[len(layers), H, T, P²]`` float32. The backward reaches only the lowest layer asked."""
        ids = prompt.input_ids.to(self.vlm.device)
        mask = prompt.attention_mask.to(self.vlm.device)
        with torch.enable_grad(), self.vlm.catch_attention(list(layers)) as caught:
            score = self.vlm.match_logit(pixels.to(self.vlm.device), ids, mask)
        attn = [caught[li] for li in layers]
        grads = torch.autograd.grad(score.sum(), attn, allow_unused=True, materialize_grads=True)
        return torch.stack([gradcam_attention(a[0].detach(), g[0], mask[0])
                            for a, g in zip(attn, grads)]).float().cpu()

    # --- extract / extend ----------------------------------------------------------------------
    def work_size(self, h: int, w: int) -> tuple[int, int]:
        """The post-processing size: the image size, scaled down to ``work_max_side``."""
        m = int(self.settings["work_max_side"])
        f = min(1.0, m / max(h, w)) if m > 0 else 1.0
        return max(1, round(h * f)), max(1, round(w * f))

    def extract(self, image: np.ndarray, classes: ClassSet,
                present: Sequence[int] | None = None) -> Evidence:
        """The first pass (no patch dropped) for every layer and head (see the module doc)."""
        image = check_image(image)
        labels = self.present_classes(image, classes, present)
        L, H, P = self.vlm.layers, self.vlm.heads, self.grid
        size = self.work_size(*image.shape[:2])
        rgb = image if size == image.shape[:2] else np.asarray(
            Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        if labels:
            prompt, pick = self.picked(classes, labels)
            g = self.gradcam_pass(self.preprocess(image), prompt, range(L))   # L x H x T x P²
            maps = class_salience(g, [prompt.groups[k] for k in pick])         # L x H x K x P²
            salience = aggregated_salience(g, picked_rows(prompt, pick))       # L x H x P²
        else:
            maps, salience = torch.zeros(L, H, 0, P * P), torch.zeros(L, H, P * P)
        tensors = {"salience": salience.view(L, H, P, P).contiguous(),
                   "rgb": torch.from_numpy(np.array(rgb, np.uint8))}
        tensors.update(self.pack_maps(maps.view(L, H, len(labels), P, P)))
        meta = {"background": classes.background, "num_classes": len(classes.names),
                "present": labels, "image_size": list(image.shape[:2]), "work_size": list(size),
                "grid": P, "layers": L, "heads": H}
        return Evidence(tensors, meta)

    def pack_maps(self, maps: torch.Tensor) -> dict[str, torch.Tensor]:
        """``maps`` (float32) as stored: as is, or float16 divided by each map's maximum plus
        the float32 maxima ``maps_scale`` (GradCAM values can lie below float16's range)."""
        if self.settings["evidence_dtype"] == "float32":
            return {"maps": maps.contiguous()}
        scale = maps.amax(dim=(-2, -1))
        q = maps / torch.where(scale > 0, scale, 1.0)[..., None, None]
        return {"maps": q.to(torch.float16).contiguous(), "maps_scale": scale.contiguous()}

    @staticmethod
    def first_pass_maps(evidence: Evidence, layer: int, head: int) -> torch.Tensor:
        """``[K, P, P]`` float32 class maps of the first pass, 1-based layer and head."""
        m = evidence.tensors["maps"][layer - 1, head - 1].float()
        if "maps_scale" in evidence.tensors:
            m = m * evidence.tensors["maps_scale"][layer - 1, head - 1][:, None, None]
        return m

    @staticmethod
    def needs_extension(knobs: Mapping[str, Any]) -> bool:
        """Whether ``extend`` adds anything for these extraction knobs: only with D > 1 (with
        D = 1 the first pass, in ``extract``, is the whole of step 4; the search then skips
        ``extend``: no image read, no empty cache entry)."""
        return int(knobs.get("drop_iters", 1)) > 1

    @staticmethod
    def check_knobs(knobs: Mapping[str, Any], layers: int, heads: int) -> tuple[int, int, int]:
        """1-based (layer, head) and D from ``knobs``, validated."""
        layer, head, d = int(knobs["layer"]), int(knobs["head"]), int(knobs["drop_iters"])
        if not 1 <= layer <= layers:
            raise OvssError(f"pnp: layer must be in 1..{layers} (1-based), got {layer}")
        if not 1 <= head <= heads:
            raise OvssError(f"pnp: head must be in 1..{heads} (1-based), got {head}")
        if d < 1:
            raise OvssError(f"pnp: drop_iters must be >= 1 (1 = no Salience DropOut), got {d}")
        return layer, head, d

    def extend(self, evidence: Evidence, image: np.ndarray, classes: ClassSet,
               present: Sequence[int] | None, knobs: Mapping[str, Any]) -> Evidence:
        """Salience DropOut (step 4) of one (layer, head): passes 1..D-1 (see the module doc).
        ``present`` is not read: the prompt's classes are the evidence's."""
        image = check_image(image)
        meta = evidence.meta
        layer, head, d = self.check_knobs(knobs, meta["layers"], meta["heads"])
        labels, P = list(meta["present"]), int(meta["grid"])
        s = self.settings
        dropped = torch.zeros(P * P, dtype=torch.bool)
        chain, masks = [], []
        if labels and d > 1:
            prompt, pick = self.picked(classes, labels)
            groups, rows = [prompt.groups[k] for k in pick], picked_rows(prompt, pick)
            pixels, fill = self.preprocess(image), self.fill_value()
            u = evidence.tensors["salience"][layer - 1, head - 1].flatten().float()
            for t in range(1, d):
                dropped = salience_dropout_selection(u, dropped, s["drop_rule"], t - 1,
                                                     int(s["drop_k"]), float(s["drop_threshold"]))
                x = drop_patches(pixels, dropped, self.vlm.patch, fill)
                g = self.gradcam_pass(x, prompt, [layer - 1])[0, head - 1]      # T x P²
                chain.append(dropout_masked_map(class_salience(g, groups), dropped))
                masks.append(dropped.clone())
                u = aggregated_salience(g, rows, dropped)
        k = len(labels)
        tensors = {
            "chain": (torch.stack(chain) if chain else torch.zeros(0, k, P * P)).view(-1, k, P, P),
            "dropped": (torch.stack(masks) if masks else torch.zeros(0, P * P, dtype=torch.bool)
                        ).view(-1, P, P).to(torch.uint8),
        }
        return Evidence({n: t.contiguous() for n, t in tensors.items()},
                        {"chain": {"layer": layer, "head": head, "drop_iters": d}})

    # --- decode --------------------------------------------------------------------------------
    def aggregated_maps(self, evidence: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """M^ of the chosen (layer, head, D): ``[K, P, P]`` float32 (step 4's sum)."""
        meta = evidence.meta
        layer, head, d = self.check_knobs(params, meta["layers"], meta["heads"])
        parts = [self.first_pass_maps(evidence, layer, head)]
        if d > 1:
            chain = evidence.tensors.get("chain")
            got = evidence.meta.get("chain", {})
            if chain is None or chain.shape[0] < d - 1 or (
                    got.get("layer"), got.get("head")) != (layer, head):
                raise OvssError("pnp: decode needs the drop chain of this (layer, head, "
                                "drop_iters): merge extend(...)'s evidence first")
            parts += list(chain[:d - 1].float())
        return dropout_aggregate(torch.stack(parts), float(self.settings["first_weight"]))

    @torch.no_grad()
    def decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        """HxW int64 label map at the original image size (step 5, postprocess.py)."""
        meta = evidence.meta
        agg = self.aggregated_maps(evidence, params)
        k, p = agg.shape[0], agg.shape[-1]
        b = relative_threshold(agg.view(k, p * p), float(params["threshold"])).view(k, p, p)
        size = tuple(meta["work_size"])
        rgb = evidence.tensors["rgb"].numpy()
        idx = channels_to_labels(b, size, bool(meta["background"]), float(params["sigma"]),
                                 bool(params["crf"]), rgb, self.settings)
        lut = np.asarray(([0] if meta["background"] else []) + list(meta["present"]) or [0],
                         np.int64)
        return resize_nearest(lut[idx], tuple(meta["image_size"]))


def picked_rows(prompt: Prompt, pick: Sequence[int]) -> list[int]:
    """The token rows of the picked classes (the rows U, the drop salience, sums)."""
    return [r for k in pick for r in prompt.groups[k]]

