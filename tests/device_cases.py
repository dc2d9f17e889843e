"""What tests/test_gpu.py runs on every device: every method, tiny backbone and settings
profile, and every decode variant, read from the method specs (conf/methods/*.yaml), so that a
new method, backbone, protocol preset or variant choice joins without an edit here.

- a *profile* is one extraction setting: a method's backbone with a ``tiny:`` block (the real
  model class, random weights), with its ``smoke`` preset, and once more with each other preset
  that sets ``settings`` (clipseg's protocols);
- its *variants* are decode settings: the paper defaults (with the smoke preset's ``set``),
  then each choice of each categorical knob of the space, and the other value of each boolean
  default, one at a time.

Nothing here imports Ray, Optuna or MLflow: these run on the GPU machine, where they are not
installed (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from methods import METHODS, get_segmenter_class
from methods.base import ClassSet, Evidence, Segmenter
from methods.spec import CategoricalParam, load_method_spec
from search.core.config import resolve

#: The image every profile segments (H, W): small, not square, not a multiple of a patch.
IMAGE_SIZE = (45, 61)
#: Classes present in the image: cat, dog, person (VOC label values), given to ``extract``.
PRESENT = [8, 12, 15]
#: Settings that make the tiny cases cheaper without changing a code path under test.
CHEAPER = {"templates": "simple"}


@dataclass
class Profile:
    """One extraction setting of one method (see the module doc)."""

    name: str
    method: str
    backbone: dict[str, Any]
    settings: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> full params

    def settings_for(self, precision: str) -> dict[str, Any]:
        """``float32``: evidence (and model weights, where a setting picks them) in float32;
        ``float16``: the settings a search uses (the YAML's, with float16 evidence)."""
        s = dict(self.settings)
        if precision == "float32":
            if "evidence_dtype" in s:
                s["evidence_dtype"] = "float32"
            if "dtype" in s:
                s["dtype"] = "float32"
        elif "evidence_dtype" in s:
            s["evidence_dtype"] = "float16"
        return s

    def has_float16(self) -> bool:
        return "evidence_dtype" in self.settings or "dtype" in self.settings

    def build(self, precision: str, device: str) -> Segmenter:
        cls = get_segmenter_class(self.method)
        return cls.from_spec(self.backbone, self.settings_for(precision), device)


def voc_classes() -> ClassSet:
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    return ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)


def variants(defaults: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, dict]:
    """``defaults`` first, then one knob changed at a time: each choice of a categorical knob,
    the other value of a boolean default."""
    out = {"defaults": dict(defaults)}
    for k, p in space.items():
        if isinstance(p, CategoricalParam):
            for c in p.choices:
                if c != defaults[k]:
                    out[f"{k}={c}"] = {**defaults, k: c}
    for k, v in defaults.items():
        if isinstance(v, bool) and f"{k}={not v}" not in out:
            out[f"{k}={not v}"] = {**defaults, k: not v}
    return out


def profiles() -> list[Profile]:
    out = []
    for method in METHODS:
        spec = load_method_spec(method)
        smoke = spec.presets.get("smoke")
        extra = {k: p for k, p in spec.presets.items() if k != "smoke" and p.settings}
        for bname, bspec in spec.backbones.items():
            if "tiny" not in bspec.loading_fields(bname):
                continue
            r = resolve(spec, backbone=bname, dataset="voc21", preset=smoke)
            base = {**r.settings, **{k: v for k, v in CHEAPER.items() if k in r.settings}}
            for pname, preset in [("", None), *extra.items()]:
                settings = {**base, **(preset.settings if preset else {})}
                name = "-".join(filter(None, (method, bname, pname)))
                out.append(Profile(name, method, dict(r.backbone), settings,
                                   variants(r.defaults, r.space)))
    return out


def image(seed: int = 11) -> np.ndarray:
    from bench.common import smooth_image

    return smooth_image(np.random.default_rng(seed), *IMAGE_SIZE)


def evidence(seg: Segmenter, img: np.ndarray, classes: ClassSet, params: Mapping[str, Any],
             base: Evidence) -> Evidence:
    """``base`` (extract's) with the knob-dependent extension of ``params`` merged in, as the
    search's evidence_for does."""
    if not seg.extraction_knobs:
        return base
    knobs = seg.extraction_subset(params)
    if not getattr(seg, "needs_extension", lambda _k: True)(knobs):
        return base
    return base.merged(seg.extend(base, img, classes, PRESENT, knobs))


#: Public methods that give decode's float scores before the argmax, tried in this order (the
#: CLIP family's logits; PnP's aggregated maps M^). Methods without one are compared on their
#: evidence and label maps only.
SCORE_METHODS = ("scaled_logits", "aggregated_maps")


def scores(seg: Segmenter, ev: Evidence, params: Mapping[str, Any]):
    for name in SCORE_METHODS:
        if hasattr(seg, name):
            return getattr(seg, name)(ev, params).float().cpu()
    return None
