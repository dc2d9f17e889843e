"""The Segmenter protocol's contract, one suite run by every method and every clipseg variant
(as Optuna runs one storage test suite against every storage).

A case is a tiny real backbone from the method's YAML, a class set, an image, knobs, and the
method's own straight pipeline (one full forward per configuration, its ``reference`` module).
Every case must satisfy:

- ``extract``: Evidence of torch tensors and JSON-serialisable meta; ``decode``: H x W int64,
  values in [0, len(classes));
- determinism: the same image gives bit-identical evidence and label maps;
- a cache round trip (``search.core.cache.EvidenceCache`` put, then get from a fresh cache that
  reads the file) decodes to the same label map;
- ``decode(extract(x), p)`` equals the straight pipeline with float32 evidence;
- float16 evidence agrees with float32 on at least ``FP16_AGREEMENT`` of the pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from methods.base import ClassSet, Evidence, Segmenter
from methods.spec import load_method_spec
from search.core.cache import EvidenceCache
from search.core.config import resolve

#: float16 evidence must give the float32 label on at least this fraction of the pixels.
FP16_AGREEMENT = 0.99


@dataclass
class Case:
    """One method configuration under contract."""

    name: str
    make: Callable[[str], Segmenter]            # evidence_dtype -> segmenter
    params: dict[str, Any]
    classes: ClassSet
    straight: Callable[..., np.ndarray]         # (seg, image, classes, params, present)
    present: list[int] | None = None
    size: tuple[int, int] = (40, 57)
    xfail: dict[str, str] = field(default_factory=dict)   # check name -> precise reason


_SEGS: dict[tuple[str, str], Segmenter] = {}


def _cached(key: tuple[str, str], build: Callable[[], Segmenter]) -> Segmenter:
    if key not in _SEGS:
        _SEGS[key] = build()
    return _SEGS[key]


def _voc_classes() -> ClassSet:
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    return ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)


# --- clipseg: every variant, and every protocol with its own variant ---------------------------
def _clipseg_case(attention: str, protocol: str, **knobs: Any) -> Case:
    from methods.clipseg import SEGMENTER
    from methods.clipseg.reference import full_forward_labels

    spec = load_method_spec("clipseg")
    r = resolve(spec, backbone="tiny", dataset="voc21", preset=spec.presets["smoke"])
    tiny = {**r.backbone, "tiny": {**r.backbone["tiny"], "heads": 4, "layers": 5}}
    geom = {"short_side": 48, "window": 32, "stride": 16}
    if protocol == "naclip":
        geom = {"short_side": 40}                         # whole image, as NACLIP on VOC
    if attention == "scclip":         # 36 patches a window: LOF's 30 neighbours (no clamp)
        geom = {"short_side": 48, "window": 48, "stride": 16}
    settings = {**r.settings, **geom, "protocol": protocol, "templates": "simple",
                "variants": [attention]}

    def make(dtype: str) -> Segmenter:
        return _cached(("clipseg-" + protocol + attention, dtype), lambda: SEGMENTER.from_spec(
            tiny, {**settings, "evidence_dtype": dtype}))

    p = {**r.defaults, "attention": attention, "layer": 2, "bg_threshold": 0.07,
         "min_pts": 2, **knobs}
    tag = "-pamr" if knobs.get("pamr_steps") else ""
    return Case(f"clipseg-{attention}-{protocol}{tag}", make, p, _voc_classes(),
                lambda seg, img, cs, prm, present: full_forward_labels(seg, img, cs, prm))


# --- clipseg with a second vision model: proxyclip and trident (tiny models of the YAML) -------
def _second_case(attention: str, vision: str, refine: bool = False) -> Case:
    from methods.clipseg import SEGMENTER
    from methods.clipseg.reference import full_forward_labels

    spec = load_method_spec("clipseg")
    r = resolve(spec, backbone="tiny", dataset="voc21", preset=spec.presets["smoke_second"])
    tiny = {**r.backbone, "tiny": {**r.backbone["tiny"], "heads": 4, "layers": 5}}
    settings = {**r.settings, "short_side": 48, "window": 32, "stride": 16,
                "protocol": "trident" if attention == "trident" else "proxyclip",
                "templates": "simple", "variants": [attention]}
    if attention == "proxyclip":
        settings.update({"pad_to": 16, "sam": None})
    else:
        settings.update({"align": 8})

    def make(dtype: str) -> Segmenter:
        return _cached(("clipseg-" + attention, dtype), lambda: SEGMENTER.from_spec(
            tiny, {**settings, "evidence_dtype": dtype}))

    p = {**r.defaults, "attention": attention, "vision": vision, "beta": 1.0, "gamma": 4.0,
         "bg_threshold": 0.02, "sam_refine": refine, "sam_iou_thresh": -10.0,
         "coarse_thresh": 0.05, "minimal_area": 4}
    name = f"clipseg-{attention}-{vision}" + ("-refine" if refine else "")
    xfail = {}
    if refine:
        xfail["straight"] = ("SAM's masks are thresholded at logit 0: decode's class "
                             "probabilities differ from the straight forward's by ~1e-6 and move "
                             "a few mask-boundary pixels (agreement >= 99.5 %, "
                             "test_clipseg_trident::test_refinement_equals_official; the same "
                             "inputs give the same labels bit for bit there)")
    return Case(name, make, p, _voc_classes(),
                lambda seg, img, cs, prm, present: full_forward_labels(seg, img, cs, prm),
                xfail=xfail)


# --- pnp and fseg: their tiny backbones from their YAML ---------------------------------------
def _pnp_case(arch_backbone: str) -> Case:
    from methods.pnp import SEGMENTER
    from methods.pnp.reference import naive_segment

    spec = load_method_spec("pnp")
    r = resolve(spec, backbone=arch_backbone, dataset="voc21", preset=spec.presets["smoke"])
    settings = {**r.settings, "presence": "all"}

    def make(dtype: str) -> Segmenter:
        return _cached(("pnp-" + arch_backbone, dtype), lambda: SEGMENTER.from_spec(
            r.backbone, {**settings, "evidence_dtype": dtype}))

    classes = ClassSet.from_names(["cat", "dog", "pottedplant", "tvmonitor"], background=True)
    return Case(f"pnp-{arch_backbone}", make, dict(r.defaults), classes,
                lambda seg, img, cs, prm, present: naive_segment(seg, img, cs, prm, present),
                present=[1, 3, 4], size=(45, 61))


def _fseg_case(backbone: str) -> Case:
    from methods.fseg import SEGMENTER
    from methods.fseg.reference import straight_labels

    spec = load_method_spec("fseg")
    r = resolve(spec, backbone=backbone, dataset="voc21", preset=spec.presets["smoke"])

    def make(dtype: str) -> Segmenter:
        return _cached(("fseg-" + backbone, dtype), lambda: SEGMENTER.from_spec(
            r.backbone, {**r.settings, "evidence_dtype": dtype}))

    classes = ClassSet.from_names(["cat", "dog", "potted plant"], background=True)
    return Case(f"fseg-{backbone}", make, dict(r.defaults), classes,
                lambda seg, img, cs, prm, present: straight_labels(seg, img, cs, prm, present),
                present=[1, 3], size=(40, 60))


VARIANTS = ("qk", "kk_last", "kk_mid", "cra", "clearclip", "sclip", "naclip", "maskclip",
            "scclip")
CASES = {
    **{f"clipseg-{v}-cra": (lambda v=v: _clipseg_case(v, "cra")) for v in VARIANTS[:-1]},
    **{f"clipseg-{p}-{p}": (lambda p=p: _clipseg_case(p, p))
       for p in ("sclip", "naclip", "clearclip")},
    # scclip: a small class-token weight, else the random tiny model gives a constant map (its
    # class token outweighs the patches; under SC-CLIP's VOC rules the area rule then leaves
    # only background)
    "clipseg-scclip-cra": lambda: _clipseg_case("scclip", "cra", res_cls=0.1),
    "clipseg-scclip-scclip": lambda: _clipseg_case("scclip", "scclip", res_cls=0.0),
    # NACLIP's main results protocol: PAMR on (10 steps, dilations 8 and 16)
    "clipseg-naclip-naclip-pamr": lambda: _clipseg_case("naclip", "naclip", pamr_steps=10,
                                                        pamr_dilations="8,16"),
    "clipseg-cra-cra-pamr": lambda: _clipseg_case("cra", "cra", pamr_steps=5,
                                                  pamr_dilations="1,2,4"),
    "clipseg-cra-custom": lambda: _clipseg_case("cra", "custom"),
    "clipseg-proxyclip-dino": lambda: _second_case("proxyclip", "tiny-dino"),
    "clipseg-proxyclip-dinov2": lambda: _second_case("proxyclip", "tiny-dinov2-reg"),
    "clipseg-trident": lambda: _second_case("trident", "tiny-dino"),
    "clipseg-trident-refine": lambda: _second_case("trident", "tiny-dinov2-reg", refine=True),
    "pnp-tiny": lambda: _pnp_case("tiny"),
    "pnp-tiny-bridgetower": lambda: _pnp_case("tiny-bridgetower"),
    "fseg-tiny": lambda: _fseg_case("tiny"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def structured_image(size: tuple[int, int], seed: int = 11) -> np.ndarray:
    """HxWx3 uint8: a bilinear 5 x 7 colour field plus noise (regions the models can tell)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 7, 3)).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None],
                                          size=size, mode="bilinear", align_corners=False)
    noise = rng.normal(0, 15, (*size, 3))
    return (img[0].permute(1, 2, 0).numpy() + noise).clip(0, 255).astype(np.uint8)


def _evidence(seg: Segmenter, case: Case, image: np.ndarray) -> Evidence:
    ev = seg.extract(image, case.classes, case.present)
    if seg.extraction_knobs:
        ev = ev.merged(seg.extend(ev, image, case.classes, case.present,
                                  seg.extraction_subset(case.params)))
    return ev


def _check_xfail(case: Case, check: str) -> None:
    if check in case.xfail:
        pytest.xfail(case.xfail[check])


# --- the contract -------------------------------------------------------------------------
def test_extract_and_decode_shapes_and_ranges(case):
    _check_xfail(case, "shapes")
    seg = case.make("float32")
    image = structured_image(case.size)
    ev = _evidence(seg, case, image)
    assert ev.tensors and all(isinstance(t, torch.Tensor) for t in ev.tensors.values())
    assert all(t.device.type == "cpu" for t in ev.tensors.values())
    json.dumps(ev.meta)                                            # serialisable
    out = seg.decode(ev, case.params)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    assert out.shape == image.shape[:2]
    assert 0 <= out.min() and out.max() < len(case.classes.names)


def test_deterministic(case):
    _check_xfail(case, "deterministic")
    seg = case.make("float32")
    image = structured_image(case.size)
    a, b = _evidence(seg, case, image), _evidence(seg, case, image)
    assert a.tensors.keys() == b.tensors.keys() and a.meta == b.meta
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert np.array_equal(seg.decode(a, case.params), seg.decode(a, case.params))


def test_cache_round_trip(case, tmp_path):
    _check_xfail(case, "cache")
    seg = case.make("float16")
    image = structured_image(case.size)
    ev = _evidence(seg, case, image)
    EvidenceCache(tmp_path).put(seg.method, "k" * 40, ev)
    back = EvidenceCache(tmp_path).get(seg.method, "k" * 40)      # a fresh cache: from disk
    assert back is not None and back.meta == json.loads(json.dumps(ev.meta))
    for k, t in ev.tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t), k
    assert np.array_equal(seg.decode(back, case.params), seg.decode(ev, case.params))


def test_decode_of_extract_equals_straight_pipeline(case):
    _check_xfail(case, "straight")
    seg = case.make("float32")
    image = structured_image(case.size)
    got = seg.decode(_evidence(seg, case, image), case.params)
    want = case.straight(seg, image, case.classes, case.params, case.present)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) > 1                                  # not a constant map


def test_float16_evidence_agrees_with_float32(case):
    _check_xfail(case, "float16")
    image = structured_image(case.size, seed=12)
    s16, s32 = case.make("float16"), case.make("float32")
    e16, e32 = _evidence(s16, case, image), _evidence(s32, case, image)
    assert e16.nbytes() < e32.nbytes()
    agree = float((s16.decode(e16, case.params) == s32.decode(e32, case.params)).mean())
    assert agree >= FP16_AGREEMENT, f"{case.name}: {agree:.4f} of the pixels agree"
