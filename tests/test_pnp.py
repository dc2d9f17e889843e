"""PnP-OVSS: each formula against a plain-loop transcription, the all-layers-all-heads pass
against per-(layer, head) reference passes on tiny BLIP and BridgeTower, decode(extract + extend)
against the straight per-configuration pipeline, inference, errors and the YAML."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import ClassSet, Evidence, OvssError
from methods.pnp import SEGMENTER
from methods.pnp.formulas import (
    aggregated_salience,
    class_salience,
    drop_patches,
    dropout_aggregate,
    gradcam_attention,
    relative_threshold,
    salience_dropout_selection,
)
from methods.pnp.postprocess import dense_crf, gaussian_blur
from methods.pnp.reference import (
    drop_chain,
    naive_segment,
    single_head_gradcam,
    word_piece_means,
)
from methods.spec import load_method_spec
from search.core.cache import EvidenceCache
from search.core.config import resolve

TINY = {"width": 32, "layers": 3, "heads": 2, "image_size": 64, "patch_size": 16}
SETTINGS = {"image_size": 64, "drop_k": 3, "evidence_dtype": "float32", "presence": "all"}
CLASSES = ClassSet.from_names(["cat", "dog", "pottedplant", "tvmonitor"], background=True)
PRESENT = [1, 3, 4]


def params(**kw):
    return {"layer": 1, "head": 2, "threshold": 0.15, "sigma": 0.05, "drop_iters": 3,
            "crf": False, **kw}


@pytest.fixture(scope="module", params=["blip", "bridgetower"])
def seg(request):
    return SEGMENTER.from_spec({"name": "tiny", "arch": request.param, "tiny": TINY}, SETTINGS)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (5, 7, 3)).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None],
                                          size=(45, 61), mode="bilinear", align_corners=False)
    noise = rng.normal(0, 15, (45, 61, 3))
    return (img[0].permute(1, 2, 0).numpy() + noise).clip(0, 255).astype(np.uint8)


# --- formulas against transcriptions -------------------------------------------------------------
def test_gradcam_weighting_matches_loops():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(2, 4, 6), -1)
    g = torch.randn(2, 4, 6)
    mask = torch.tensor([1, 1, 0, 1])
    got = gradcam_attention(a, g, mask)
    assert got.shape == (2, 4, 5)
    for h in range(2):
        for t in range(4):
            for n in range(5):
                want = a[h, t, n + 1].item() * max(g[h, t, n + 1].item(), 0.0) * int(mask[t])
                assert got[h, t, n].item() == pytest.approx(want, abs=1e-7)


def test_class_maps_and_salience_match_loops():
    torch.manual_seed(1)
    g = torch.rand(3, 7, 9)
    groups = [(1,), (2, 3, 4), (6,)]
    maps = class_salience(g, groups)
    dropped = torch.zeros(9, dtype=torch.bool)
    dropped[[0, 5]] = True
    u = aggregated_salience(g, [1, 2, 3, 4, 6], dropped)
    for h in range(3):
        for k, rows in enumerate(groups):
            for n in range(9):
                assert maps[h, k, n].item() == pytest.approx(
                    sum(g[h, r, n].item() for r in rows) / len(rows), abs=1e-6)
        for n in range(9):
            want = 0.0 if n in (0, 5) else sum(g[h, r, n].item() for r in (1, 2, 3, 4, 6))
            assert u[h, n].item() == pytest.approx(want, abs=1e-6)


def loop_selection(u: list[float], dropped: set[int], rule: str, t: int, k: int,
                   thr: float) -> set[int]:
    free = [i for i in range(len(u)) if i not in dropped]
    if rule == "above":
        lo, hi = min(u[i] for i in free), max(u[i] for i in free)
        return dropped | {i for i in free if (u[i] - lo) / (hi - lo) >= thr}
    n = k if rule == "top_k" else len(u) // 2 ** (t + 1)
    ranked = sorted(free, key=lambda i: (-u[i], i))
    return dropped | set(ranked[:n])


@pytest.mark.parametrize("rule", ["top_k", "halving", "above"])
def test_drop_rule_matches_transcription(rule):
    rng = np.random.default_rng(2)
    u = rng.random(36).round(2)                 # rounding makes ties
    dropped: set[int] = set()
    mask = torch.zeros(36, dtype=torch.bool)
    for t in range(3):
        ut = torch.tensor(u, dtype=torch.float32).masked_fill(mask, 0.0)
        want = loop_selection(list(ut.tolist()), dropped, rule, t, 5, 0.6)
        mask = salience_dropout_selection(ut, mask, rule, t, k=5, threshold=0.6)
        assert set(torch.nonzero(mask).flatten().tolist()) == want
        assert want > dropped                   # every iteration drops something new
        dropped = want
        u = rng.random(36).round(2)
    if rule == "top_k":
        assert len(dropped) == 15
    if rule == "halving":
        assert len(dropped) == 18 + 9 + 4


def test_drop_patches_blacks_out_blocks():
    x = torch.randn(1, 3, 8, 8)
    dropped = torch.tensor([False, True, False, False])     # patch (0, 1) of a 2x2 grid
    fill = torch.tensor([1.0, 2.0, 3.0])
    y = drop_patches(x, dropped, 4, fill)
    for c in range(3):
        for i in range(8):
            for j in range(8):
                want = fill[c] if (i < 4 and j >= 4) else x[0, c, i, j]
                assert y[0, c, i, j].item() == pytest.approx(float(want))


def test_aggregate_and_threshold_match_transcription():
    torch.manual_seed(4)
    m = torch.rand(4, 2, 6)
    agg = dropout_aggregate(m, 2.0)
    b = relative_threshold(agg, 0.3)
    for k in range(2):
        vals = [2 * m[0, k, n].item() + sum(m[t, k, n].item() for t in (1, 2, 3))
                for n in range(6)]
        lo, hi = min(vals), max(vals)
        for n in range(6):
            assert agg[k, n].item() == pytest.approx(vals[n], abs=1e-6)
            keep = (vals[n] - lo) / (hi - lo) >= 0.3
            assert b[k, n].item() == pytest.approx(vals[n] if keep else 0.0, abs=1e-6)


def test_blur_normalises_and_crf_follows_colour_edges():
    x = np.zeros((2, 20, 20))
    x[0, 5, 5] = 1.0
    out = gaussian_blur(x, 2.0)
    assert out[0].max() == pytest.approx(1.0) and out[0].min() == 0.0
    assert out[0, 5, 7] > out[0, 5, 9] > 0 and not out[1].any()   # constant channel -> 0
    # Left half red, right half blue; the unary is noisy: the CRF aligns labels with colours.
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[:, :12, 0] = 255
    rgb[:, 12:, 2] = 255
    truth = np.zeros((24, 24), np.int64)
    truth[:, 12:] = 1
    rng = np.random.default_rng(0)
    p1 = np.clip(np.where(truth == 1, 0.6, 0.4) + rng.normal(0, 0.25, (24, 24)), 0.01, 0.99)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    q = dense_crf(probs, rgb, {})
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q.argmax(0) == truth).mean() > (probs.argmax(0) == truth).mean() + 0.1


# --- the model passes ----------------------------------------------------------------------------
def test_all_layers_heads_pass_equals_single_head_passes(seg, image):
    prompt = seg.prompt(CLASSES, PRESENT)
    pixels = seg.preprocess(image)
    every = seg.gradcam_pass(pixels, prompt, range(seg.vlm.layers))
    ev = seg.extract(image, CLASSES, PRESENT)
    assert ev.tensors["maps"].shape == (3, 2, 3, 4, 4)
    for layer in range(seg.vlm.layers):
        for head in range(seg.vlm.heads):
            ref = single_head_gradcam(seg, pixels, prompt, layer, head)
            scale = ref.abs().max().clamp(min=1e-30)
            if layer < seg.vlm.layers - 1:      # only [ENC]/[CLS] rows matter in the last layer
                assert ref[list(prompt.class_rows)].max() > 0
            assert float((every[layer, head] - ref).abs().max() / scale) < 1e-5
            maps = word_piece_means(ref, prompt.groups).view(3, 4, 4)
            got = ev.tensors["maps"][layer, head]
            assert float((got - maps).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("knobs", [params(), params(layer=2, head=1, drop_iters=4, crf=True,
                                                    threshold=0.3, sigma=0.09)])
def test_decode_extract_equals_straight_pipeline(seg, image, knobs):
    ev = seg.extract(image, CLASSES, PRESENT)
    extra = seg.extend(ev, image, CLASSES, PRESENT, seg.extraction_subset(knobs))
    ours = seg.decode(ev.merged(extra), knobs)
    naive = naive_segment(seg, image, CLASSES, knobs, PRESENT)
    assert ours.shape == image.shape[:2] and ours.dtype == np.int64
    assert set(np.unique(ours)) <= {0, *PRESENT} and len(np.unique(ours)) > 1
    np.testing.assert_array_equal(ours, naive)
    np.testing.assert_array_equal(seg.segment(image, CLASSES, knobs, PRESENT), naive)


@pytest.mark.parametrize("rule, counts", [("top_k", [3, 6, 9]), ("halving", [8, 12, 14]),
                                          ("above", None)])
def test_every_drop_rule_end_to_end_against_the_reference(seg, image, rule, counts):
    """For each drop rule, extend's chain (which patches are dropped before each pass, and the
    masked maps of the passes) and the label map equal the straight pipeline's. ``halving``
    depends on the iteration: after pass t it drops N // 2^(t+1) more of the N = 16 patches
    (8, 4, 2), so handing the rule the pass being prepared instead of the pass just run would
    drop 4, 2, 1."""
    ruled = SEGMENTER(seg.vlm, {"name": "tiny", "tiny": TINY}, {**SETTINGS, "drop_rule": rule})
    knobs = params(layer=2, head=1, drop_iters=4)
    ev = ruled.extract(image, CLASSES, PRESENT)
    extra = ruled.extend(ev, image, CLASSES, PRESENT, ruled.extraction_subset(knobs))
    maps, sets = drop_chain(ruled, image, CLASSES, PRESENT, 2, 1, 4)
    got = [set(torch.nonzero(d.flatten()).flatten().tolist()) for d in extra.tensors["dropped"]]
    assert got == sets[1:] and sets[0] == set()
    assert len(sets[1]) < len(sets[2]) < len(sets[3]) < 16         # each pass drops more
    if counts is not None:
        assert [len(d) for d in sets[1:]] == counts
    for t in range(1, 4):
        want = maps[t].view(3, 4, 4)
        scale = want.abs().max().clamp(min=1e-30)
        assert float((extra.tensors["chain"][t - 1] - want).abs().max() / scale) < 1e-5
    ours = ruled.decode(ev.merged(extra), knobs)
    assert len(np.unique(ours)) > 1
    np.testing.assert_array_equal(ours, naive_segment(ruled, image, CLASSES, knobs, PRESENT))


def test_drop_chain_and_float16_evidence(seg, image):
    ev = seg.extract(image, CLASSES, PRESENT)
    extra = seg.extend(ev, image, CLASSES, PRESENT, {"layer": 1, "head": 1, "drop_iters": 4})
    assert extra.tensors["chain"].shape == (3, 3, 4, 4)
    counts = extra.tensors["dropped"].flatten(1).sum(1).tolist()
    assert counts == [3, 6, 9]                  # drop_k = 3 per iteration, cumulative
    dropped = extra.tensors["dropped"].bool()
    assert not extra.tensors["chain"][dropped[:, None].expand_as(
        extra.tensors["chain"])].any()          # dropped patches are zero in the maps
    assert not torch.equal(extra.tensors["chain"][0], ev.tensors["maps"][0, 0])
    half = SEGMENTER(seg.vlm, {"name": "tiny", "tiny": TINY},
                     {**SETTINGS, "evidence_dtype": "float16"})
    ev16 = half.extract(image, CLASSES, PRESENT)
    assert ev16.tensors["maps"].dtype == torch.float16
    for layer in (1, 2):
        exact = seg.first_pass_maps(ev, layer, 2)
        rel = (half.first_pass_maps(ev16, layer, 2) - exact).abs().max() / exact.abs().max()
        assert float(rel) < 1e-3
    x16 = half.extend(ev16, image, CLASSES, PRESENT, seg.extraction_subset(params()))
    agree = (half.decode(ev16.merged(x16), params()) == seg.segment(image, CLASSES, params(),
                                                                    PRESENT)).mean()
    assert agree > 0.98


def test_evidence_survives_the_cache_and_d1_needs_no_extension(seg, image, tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    ev = seg.extract(image, CLASSES, PRESENT)
    extra = seg.extend(ev, image, CLASSES, PRESENT, {"layer": 2, "head": 2, "drop_iters": 1})
    assert extra.tensors["chain"].shape[0] == 0
    cache.put("pnp", "a" * 64, ev)
    cache.put("pnp", "b" * 64, extra)
    back = cache.get("pnp", "a" * 64).merged(cache.get("pnp", "b" * 64))
    p = params(layer=2, head=2, drop_iters=1)
    np.testing.assert_array_equal(seg.decode(back, p), naive_segment(seg, image, CLASSES, p,
                                                                     PRESENT))
    with pytest.raises(OvssError, match="drop chain"):
        seg.decode(ev, params(drop_iters=2))


def test_background_and_class_sets_without_background(seg, image):
    ev = seg.extract(image, CLASSES, [0])       # only background present: no prompt at all
    assert ev.meta["present"] == [] and not seg.decode(ev, params(drop_iters=1)).any()
    no_bg = ClassSet.from_names(["cat", "dog", "tvmonitor"])
    lab = seg.segment(image, no_bg, params(threshold=0.5), [0, 2])
    assert set(np.unique(lab)) == {0, 2}        # label 0 is "cat" here, a real class
    strict = seg.decode(seg.extract(image, CLASSES, PRESENT), params(drop_iters=1, threshold=0.9))
    loose = seg.decode(seg.extract(image, CLASSES, PRESENT), params(drop_iters=1, threshold=0.05))
    assert (strict == 0).sum() > (loose == 0).sum()   # background where no class passes T


# --- inference, presence, errors, YAML -----------------------------------------------------------
def test_inference_path_writes_image_sized_label_map(image, tmp_path):
    import yaml
    from PIL import Image

    from methods.infer import main as infer_main

    spec = load_method_spec("pnp")
    r = resolve(spec, backbone="tiny", preset=spec.presets["smoke"])
    cfg = {"method": "pnp", "backbone": r.backbone, "settings": r.settings,
           "params": r.defaults, "classes": {"background": True}}
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(cfg))
    Image.fromarray(image).save(tmp_path / "img.png")
    out = tmp_path / "pred.png"
    assert infer_main(["--config", str(tmp_path / "tuned.yaml"), "--image",
                       str(tmp_path / "img.png"), "--classes", "cat,dog", "--out",
                       str(out)]) == 0
    pred = np.array(Image.open(out))
    assert pred.shape == image.shape[:2] and pred.max() <= 2


def test_presence_filter_is_pluggable(seg, image):
    calls = []

    def only_dog(img, classes):
        calls.append(img.shape)
        return [classes.names.index("dog")]

    seg.presence_filter = only_dog
    try:
        lab = seg.segment(image, CLASSES, params(), present=None)
    finally:
        seg.presence_filter = None
    assert calls == [image.shape] and set(np.unique(lab)) <= {0, 2}


def test_errors_name_the_problem(tmp_path, seg, image):
    with pytest.raises(OvssError, match="arch"):
        SEGMENTER.from_spec({"name": "x", "arch": "vilt", "model": "a/b"}, {})
    missing = tmp_path / "nowhere"
    with pytest.raises(OvssError, match="nowhere"):
        SEGMENTER.from_spec({"name": "x", "arch": "blip", "path": str(missing)}, {})
    with pytest.raises(OvssError, match="model"):
        SEGMENTER.from_spec({"name": "x", "arch": "bridgetower"}, {})
    with pytest.raises(OvssError, match="cannot load `path`"):    # not silently random weights
        SEGMENTER.from_spec({"name": "tiny", "arch": "blip", "tiny": {}, "path": str(tmp_path)},
                            {})
    with pytest.raises(OvssError, match="unknown setting"):
        SEGMENTER(seg.vlm, {"name": "tiny"}, {"image_sise": 64})
    with pytest.raises(OvssError, match="drop_rule"):
        SEGMENTER(seg.vlm, {"name": "tiny"}, {**SETTINGS, "drop_rule": "random"})
    ev = seg.extract(image, CLASSES, PRESENT)
    with pytest.raises(OvssError, match="head must be in 1..2"):
        seg.decode(ev, params(head=3))
    with pytest.raises(OvssError, match="layer"):
        seg.extend(ev, image, CLASSES, PRESENT, {"layer": 0, "head": 1, "drop_iters": 2})


def test_yaml_has_the_paper_solution_and_a_fast_smoke_preset():
    spec = load_method_spec("pnp")
    blip = resolve(spec)
    assert blip.backbone["model"] == "Salesforce/blip-itm-large-flickr"
    assert {k: blip.defaults[k] for k in ("layer", "head", "threshold", "sigma")} == {
        "layer": 8, "head": 10, "threshold": 0.15, "sigma": 0.05}
    bt = resolve(spec, backbone="bridgetower-large")
    assert (bt.defaults["layer"], bt.defaults["head"]) == (2, 8)
    assert (bt.space["layer"].high, bt.space["head"].high) == (5, 16)   # 6 minus the empty last
    assert blip.space["layer"].high == 11
    smoke = resolve(spec, backbone="tiny", dataset="voc21", preset=spec.presets["smoke"])
    assert smoke.defaults["crf"] is False and spec.presets["smoke"].num_samples == 8
    assert set(SEGMENTER.extraction_knobs) <= set(blip.defaults)
    assert isinstance(Evidence().nbytes(), int)
