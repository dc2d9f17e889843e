"""The family's dense-inference protocols as named settings profiles (``settings.protocol``).

A profile fixes, per data set, what the official configs of that repository hand-set: the
short side of the resize, the sliding window and its stride (0 = the whole image as one
window), the logit scale of the softmax over names, how background is predicted, and which
class-name lists are embedded. Sources (file and line) are in docs/clipseg.md.

- ``cra``: the CRA paper's own protocol, which says it follows TCL (Cha et al., CVPR 2023):
  TCL's ``segmentation/configs/_base_/datasets/*.py`` resize to short side 448 and slide a 448
  window with stride 224 on every data set. Background: our threshold rule (no background
  text; a pixel is background when its best class probability is below the knob
  ``bg_threshold``). Names: the data set YAML's prompts. Logit scale 40 (the paper does not
  say; SCLIP's default). The default protocol.
- ``sclip``: wangf3014/SCLIP configs; names from its ``configs/cls_*.txt`` (synonyms, and on
  VOC21 / COCO-Object a first line of 26 stuff words as the background query).
- ``naclip``: sinahmr/NACLIP configs (same name files as SCLIP, md5-identical); VOC21 and VOC20
  run on the whole image (``slide_crop=0``).
- ``clearclip``: mc-lan/ClearCLIP configs and segmentor defaults; names from its
  ``configs/cls_*.txt`` (no synonyms, class 0 is the query ``background``).
- ``scclip``: SuleBai/SC-CLIP 0417ba9 configs (name files md5-identical to SCLIP's): short
  side 336 (Cityscapes 560), 224 / 112 everywhere, its own logit scales and thresholds.
- ``custom``: the plain settings; unset ones take 448 / 224 / 112, logit scale 40 and our
  threshold rule (clipseg's settings before the protocols existed).
- ``proxyclip``: mc-lan/ProxyCLIP configs (windows padded centred to a multiple of 56), names
  from its ``configs/cls_*.txt`` (``; `` separated; VOC21 26 and COCO-Object 17 stuff words as
  the background query).
- ``trident``, ``trident_base``: YuHengsss/Trident configs (the image resized to multiples of 16
  and at least the window, SAM on the left and right halves on Cityscapes), the same name
  files as ProxyCLIP (md5-identical); ``trident`` refines with SAM (its README's
  ``--sam_refine``), ``trident_base`` does not (its ``configs/base_config.py``).

A protocol also gives the trial-0 values of the knobs its repository hand-sets per data set
(``KNOBS``, :func:`knob_defaults`): ProxyCLIP's and Trident's thresholds, ``cos_fac`` and
refinement thresholds are searched, their official values are where the search starts.

Background by a query (``background: query``): class 0 is embedded from its names, the softmax
runs over all names including class 0's, a class's probability is its best name's, SCLIP's
``area_threshold`` zeroes the probabilities of classes 1..C-1 whose argmax area is at most that
fraction of the pixels predicted as any of them, then the argmax; pixels whose best probability
is below ``prob_threshold`` become class 0.

Explicit settings (``--set settings.short_side=...``; the YAML keeps them ``null``) win over the
profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from methods.base import OvssError

NAMES_DIR = Path(__file__).resolve().parent / "names"

#: our data set name -> the reference repos' ``configs/cls_<file>.txt``
NAME_FILES = {"voc21": "voc21", "voc20": "voc20", "context60": "context60",
              "context59": "context59", "coco_object": "coco_object",
              "coco_stuff164k": "coco_stuff", "cityscapes": "city_scapes", "ade20k": "ade20k"}

#: Keys a profile may set (the rest of the segmenter's settings are untouched).
PROFILE_KEYS = ("short_side", "window", "stride", "logit_scale", "background", "prob_threshold",
                "area_threshold", "names", "pad_to", "align", "sam_split")

_QUERY = {"background": "query"}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "cra": {
        "base": {"short_side": 448, "window": 448, "stride": 224, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": None},
    },
    "sclip": {
        "base": {"short_side": 336, "window": 224, "stride": 112, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "sclip"},
        "voc21": {**_QUERY, "logit_scale": 65.0, "prob_threshold": 0.1, "area_threshold": 0.1},
        "context60": {**_QUERY, "logit_scale": 50.0, "prob_threshold": 0.1},
        "coco_object": {**_QUERY, "logit_scale": 50.0, "prob_threshold": 0.1},
        "coco_stuff164k": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
    "naclip": {
        "base": {"short_side": 336, "window": 224, "stride": 112, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "sclip"},
        "voc21": {**_QUERY, "prob_threshold": 0.1, "window": 0, "stride": 0},
        "voc20": {"window": 0, "stride": 0},
        "context60": {**_QUERY, "prob_threshold": 0.1},
        "coco_object": {**_QUERY, "prob_threshold": 0.1},
        "cityscapes": {"short_side": 560},
    },
    "clearclip": {
        "base": {"short_side": 448, "window": 448, "stride": 224, "logit_scale": 50.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "clearclip"},
        "voc21": {**_QUERY, "prob_threshold": 0.5},
        "context60": {**_QUERY, "prob_threshold": 0.15},
        "coco_object": {**_QUERY, "prob_threshold": 0.4},
        "cityscapes": {"window": 224, "stride": 224},
    },
    "scclip": {
        "base": {"short_side": 336, "window": 224, "stride": 112, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "sclip"},
        "voc21": {**_QUERY, "logit_scale": 50.0, "prob_threshold": 0.15, "area_threshold": 0.1},
        "context60": {**_QUERY, "prob_threshold": 0.15},
        "coco_object": {**_QUERY, "logit_scale": 55.0, "prob_threshold": 0.35},
        "cityscapes": {"short_side": 560},
    },
    # the plain settings; what is still unset takes the values clipseg used before protocols
    "custom": {"base": {"short_side": 448, "window": 224, "stride": 112, "logit_scale": 40.0,
                        "background": "threshold"}},
    "proxyclip": {
        "base": {"short_side": 336, "window": 336, "stride": 112, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "proxyclip", "pad_to": 56},
        "voc21": _QUERY, "context60": _QUERY, "coco_object": _QUERY,
        "ade20k": {"short_side": 448},
        "cityscapes": {"short_side": 448, "window": 224, "stride": 112},
    },
    "trident": {
        "base": {"short_side": 448, "window": 336, "stride": 224, "logit_scale": 40.0,
                 "background": "threshold", "prob_threshold": None, "area_threshold": None,
                 "names": "proxyclip", "align": 16},
        "voc21": _QUERY, "context60": {**_QUERY, "short_side": 576},
        "coco_object": _QUERY,
        "voc20": {"short_side": 336, "stride": 112},
        "context59": {"short_side": 576}, "ade20k": {"short_side": 576},
        "cityscapes": {"short_side": 688, "sam_split": 2},
    },
}
PROTOCOLS["trident_base"] = PROTOCOLS["trident"]

#: Trial-0 values of knobs, per protocol and data set ("base": every data set).
KNOBS: dict[str, dict[str, dict[str, Any]]] = {
    "proxyclip": {
        "base": {"logit_scale": 40.0, "beta": 1.2, "gamma": 3.0},
        "voc21": {"bg_threshold": 0.2}, "context60": {"bg_threshold": 0.15},
        "coco_object": {"bg_threshold": 0.25},
    },
    "trident": {
        "base": {"logit_scale": 40.0, "beta": 1.2, "gamma": 3.0, "cos_fac": 1.2,
                 "refine_neg_cos": True, "sam_refine": True, "sam_iou_thresh": 0.8,
                 "coarse_thresh": 0.2, "minimal_area": 225, "sam_mask_coff": 0.005},
        "voc21": {"bg_threshold": 0.2, "coarse_thresh": 0.2},
        "voc20": {"coarse_thresh": 0.2, "cos_fac": 0.0},
        "context60": {"bg_threshold": 0.15, "coarse_thresh": 0.15},
        "context59": {"coarse_thresh": 0.15},
        "coco_object": {"bg_threshold": 0.25, "coarse_thresh": 0.25},
        "coco_stuff164k": {"coarse_thresh": 0.05},
        "cityscapes": {"cos_fac": 3.0, "refine_neg_cos": False, "coarse_thresh": 0.1},
        "ade20k": {"refine_neg_cos": False, "coarse_thresh": 0.05},
    },
}
KNOBS["trident_base"] = {**KNOBS["trident"],
                         "base": {**KNOBS["trident"]["base"], "sam_refine": False}}


def profile(protocol: str, dataset: str | None) -> dict[str, Any]:
    """The settings a protocol fixes for a data set (``dataset`` None: the base values)."""
    if protocol not in PROTOCOLS:
        raise OvssError(f"clipseg: unknown protocol {protocol!r}; choose {sorted(PROTOCOLS)}")
    table = PROTOCOLS[protocol]
    return {**table["base"], **table.get(dataset or "", {})}


def knob_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The trial-0 knob values the protocol gives for the data set (``KNOBS``), and ``vision``:
    the first vision model extracted (``settings.vision``)."""
    table = KNOBS.get(str(settings.get("protocol") or "custom"), {})
    out = {**table.get("base", {}), **table.get(str(settings.get("dataset")), {})}
    vision = settings.get("vision") or []
    if vision:
        out["vision"] = vision[0]
    return out


def apply_protocol(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with the protocol's values filled in where the setting is None / absent."""
    prof = profile(str(settings.get("protocol") or "custom"), settings.get("dataset"))
    out = dict(settings)
    for key, value in prof.items():
        if out.get(key) is None:
            out[key] = value
    return out


@lru_cache(maxsize=32)
def reference_names(source: str, dataset: str) -> tuple[tuple[str, ...], ...]:
    """One tuple of names per class, as the reference repo lists them in ``cls_*.txt``
    (SCLIP / NACLIP split a line on ", ", ClearCLIP on ",", ProxyCLIP / Trident on "; ")."""
    path = NAMES_DIR / source / f"{NAME_FILES[dataset]}.txt"
    sep = {"sclip": ", ", "proxyclip": "; "}.get(source, ",")
    lines = path.read_text().split("\n")
    lines = [ln for ln in lines if ln.strip()]
    return tuple(tuple(n.replace("\n", "") for n in ln.split(sep)) for ln in lines)


def class_prompts(settings: Mapping[str, Any], names: tuple[str, ...],
                  prompts: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """The names to embed per class: the reference list when the protocol names one, the data
    set is known and the class set has its number of classes; else the class set's own prompts
    (e.g. inference with a tuned config on the user's own classes)."""
    source, dataset = settings.get("names"), settings.get("dataset")
    if not source or dataset not in NAME_FILES:
        return prompts
    ref = reference_names(str(source), str(dataset))
    return ref if len(ref) == len(names) else prompts
