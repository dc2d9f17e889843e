"""FSeg-LLaVA end to end: ``decode(extract(x), p)`` against the straight pipeline of
``methods/fseg/reference.py`` (the paper's steps written out again, importing none of the decode
code) on tiny LLaVA-1.5 / 1.6 + tiny SAM, for knob sets that cover every SAM prompt mode, both
refinements, both fusions, both upsampling orders, the merge rules and a class set without
background; and the tiny models see what those knobs act on, so the comparison can fail."""

from __future__ import annotations

import numpy as np
import pytest

from methods.base import ClassSet, Evidence
from methods.fseg.reference import straight_labels
from tests.test_fseg_model import CLASSES, VARIANT, tiny_segs  # noqa: F401  (tiny_segs: a fixture)

RNG = np.random.default_rng(7)
IMAGE = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
PRESENT = [1, 3]                                    # cat, potted plant (two sub-tokens)
KNOB_SETS = {
    "defaults": {},                                 # both prompts, product refinement, ...
    "points": VARIANT,                              # points only, layers l_s..l_e, nearest
    "both-guidance": {**VARIANT, "prompt": "both", "refine": "guidance",
                      "merge": "activation"},
    "box-distance-guidance": {"fusion": "distance", "refine": "guidance", "prompt": "box"},
    "box-area-drop": {**VARIANT, "prompt": "box", "upsample": "bilinear_then_argmax",
                      "merge": "area_asc", "empty": "drop", "multimask": False,
                      "snap_centroid": False, "morph": "close_open", "pool": "mean",
                      "entropy": "area_mean", "image_mass": "chord", "K": 3},
}


@pytest.fixture(scope="module")
def evidence(tiny_segs):  # noqa: F811
    """Per model, the evidence of IMAGE as the cache hands it back."""
    from safetensors.torch import load, save

    out = {}
    for name, (seg, _) in tiny_segs.items():
        ev = seg.extract(IMAGE, CLASSES, PRESENT)
        assert ev.meta["yes"] == PRESENT and ev.meta["n_sub"] == [1, 2]
        tensors, meta = ev.to_safetensors_dict()
        out[name] = Evidence.from_safetensors_dict(load(save(tensors, metadata=meta)), meta)
    return out


@pytest.mark.parametrize("knobs", list(KNOB_SETS))
@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_decode_of_extract_equals_straight_pipeline(tiny_segs, evidence, name,  # noqa: F811
                                                    knobs):
    seg, defaults = tiny_segs[name]
    params = {**defaults, **KNOB_SETS[knobs]}
    got = seg.decode(evidence[name], params)
    assert got.shape == IMAGE.shape[:2] and got.dtype == np.int64
    assert set(np.unique(got)) <= {0, *PRESENT} and (got > 0).any()    # SAM masks painted
    np.testing.assert_array_equal(got, straight_labels(seg, IMAGE, CLASSES, params, PRESENT))


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_decode_without_background_equals_straight_pipeline(tiny_segs, name):  # noqa: F811
    """No background class: pixels no SAM mask covers take the yes-class of highest D~."""
    seg, defaults = tiny_segs[name]
    classes = ClassSet.from_names(["cat", "dog", "sky"])
    params = {**defaults, **VARIANT, "prompt": "both"}
    got = seg.decode(seg.extract(IMAGE, classes, [0, 2]), params)
    assert set(np.unique(got)) == {0, 2}
    np.testing.assert_array_equal(got, straight_labels(seg, IMAGE, classes, params, [0, 2]))


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_the_tiny_models_see_what_the_knobs_act_on(tiny_segs, evidence, name):  # noqa: F811
    """On these inputs SAM's points, box and both give three different label maps, and so do the
    product refinement M_v . M^_f and M^_f alone, and D . M_A and D alone: swapping the prompts,
    never applying M_v (or always), or dropping M_A changes a label map compared above."""
    seg, defaults = tiny_segs[name]
    base = {**defaults, **VARIANT}

    def decode(**kw):
        return seg.decode(evidence[name], {**base, **kw})

    by_prompt = [decode(prompt=p) for p in ("points", "box", "both")]
    for i in range(3):
        for j in range(i):
            assert not np.array_equal(by_prompt[i], by_prompt[j])
    for prompt in ("points", "both"):
        assert not np.array_equal(decode(prompt=prompt, refine="product"),
                                  decode(prompt=prompt, refine="guidance"))
    assert not np.array_equal(decode(fusion="product"), decode(fusion="distance"))
