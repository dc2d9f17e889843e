"""The decode side of ``ClipSegSegmenter`` (segmenter.py): cached evidence + knobs -> label map.

Decode runs no transformer block. The family's and SC-CLIP's cosines come from variants.py,
``proxyclip`` / ``trident`` logits from second.py; ``pamr_steps`` > 0 refines the cosines at
the original size with PAMR (methods/pamr.py) before the logit scale, as NACLIP does; trident
with ``sam_refine`` refines the label map with SAM's masks (sam_refine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import Evidence
from methods.clipseg.labels import labels_from_probs, names_to_classes, upsample
from methods.clipseg.sam_refine import refined_labels
from methods.clipseg.second import second_logits
from methods.clipseg.variants import SECOND, check_params, window_cosines
from methods.clipseg.windows import mosaic
from methods.pamr import pamr, parse_dilations


class ClipSegDecode:
    """Decode of :class:`~methods.clipseg.segmenter.ClipSegSegmenter` (a mixin: reads its
    settings, decode head tensors and ``normalise``)."""

    settings: dict[str, Any]

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
        scale, steps = self.logit_scale(params), int(params["pamr_steps"])
        if params["attention"] in SECOND:                                  # H x N x W
            x = second_logits(self, evidence, params, scale if steps == 0 else 1.0)
            if steps == 0:
                return x
            x = x.permute(1, 0, 2)                                          # N x H x W
        else:
            cos = self.window_cosines(evidence, params)
            if steps == 0:
                x = mosaic(cos * scale, *meta["grid"])                     # N x Agh x Bgw
                return upsample(x, evidence.tensors["rows"], evidence.tensors["cols"])
            x = upsample(mosaic(cos, *meta["grid"]), evidence.tensors["rows"],
                         evidence.tensors["cols"]).permute(1, 0, 2)          # N x H x W
        x = pamr(self.guide_image(evidence), x, steps, parse_dilations(params["pamr_dilations"]))
        return x.mul_(scale).permute(1, 0, 2)

    def logit_scale(self, params: Mapping[str, Any]) -> float:
        """The knob ``logit_scale`` when set, else the protocol's setting."""
        knob = params.get("logit_scale")
        return float(self.settings["logit_scale"] if knob is None else knob)

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
        if params["attention"] == "trident" and params.get("sam_refine"):
            return refined_labels(self, evidence, params, mode, area)
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
