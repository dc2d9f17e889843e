"""Trident (``attention: trident``) and its SAM refinement, against a direct transcription of
the official code written here without our formula functions: YuHengsss/Trident a93b346
``trident.py`` 112-188 and 190-225 (SAM features, windows), 260-283 (post-processing),
``open_clip/transformer.py`` 502-659 (custom_attn, guidance_attn, get_sam_sim),
``segment_anything/modeling/image_encoder.py`` 226-243 (the last block's attention and values)
and ``seg_utils/utils.py`` 9-197 (preprocess_image, sam_refinement); on random-weight real
classes (open_clip CLIP, transformers ViTModel, segment-anything Sam) with randomised biases,
gains and relative positions. Differences the transcription makes, each because of a tiny
model: CLIP's patch is 8 (Trident's ``clip_stride`` 16), SAM's grid 8 (``sam_hw = 64``), its
mask input 32 x 32 (the literal 256); ``skimage.measure.label(connectivity=2)`` is
``scipy.ndimage.label`` with a 3 x 3 structure (both label 8-connected components)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import OvssError
from tests.second_models import TINY_CLIP, build, image, params, voc_classes
from tests.trident_official import preprocess_image, trident_official
from tests.trident_refine_official import sam_refinement_official

VISION = {
    "d8": {"arch": "dino", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                    "image_size": 56}},     # CLIP's grid: ratio 1
    "d4": {"arch": "dino", "tiny": {"hidden": 32, "layers": 1, "heads": 4, "patch": 4,
                                    "image_size": 56}},     # twice CLIP's grid: ratio 2
    "d7": {"arch": "dino", "tiny": {"hidden": 32, "layers": 1, "heads": 4, "patch": 7,
                                    "image_size": 56}},     # 8 vs 7: resized to 7
    "sam": {"arch": "sam", "tiny": {}},
}
SETTINGS = {"protocol": "trident", "dataset": "voc21", "short_side": 56, "window": 56,
            "stride": 24, "align": 8, "templates": "simple", "evidence_dtype": "float32",
            "vision": ["d8", "d4", "d7"], "vision_models": VISION, "sam": "sam",
            "variants": ["trident"]}


def sharp(s):
    """A SAM whose last-block attention is peaked (random weights give near-uniform rows, and
    G would average every token alike): its q / k projections scaled up."""
    attn = s.vision("sam").module.image_encoder.blocks[-1].attn
    with torch.no_grad():
        attn.qkv.weight[: 2 * attn.qkv.in_features] *= 4.0
    return type(s)(s.model, s.model_name, TINY_CLIP, s.settings,
                   vision={n: s.vision(n) for n in s._vision})


@pytest.fixture(scope="module")
def seg():
    return sharp(build(SETTINGS))


@pytest.fixture(scope="module")
def seg_split():
    return sharp(build({**SETTINGS, "sam_split": 2, "vision": ["d8"]}))


@pytest.fixture(scope="module")
def voc():
    return voc_classes()


def tparams(**kw):
    return params(**{"attention": "trident", "vision": "d8", "beta": 1.4, **kw})



# --- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["d8", "d4", "d7"])
def test_trident_equals_official(seg, voc, vision):
    img = image(45, 70)                       # 56 x 87 -> aligned 56 x 88, three windows
    ev = seg.extract(img, voc)
    for kw in ({"cos_fac": 2.0, "refine_neg_cos": False}, {"cos_fac": 0.6, "gamma": 5.0}):
        p = tparams(vision=vision, bg_threshold=0.05, **kw)
        want_probs, want, _, _ = trident_official(seg, img, p)
        assert (seg.decode_probs(ev, p) - want_probs).abs().max().item() < 1e-4
        got = seg.decode(ev, p)
        assert np.array_equal(got, want[0].numpy())
        assert len(np.unique(got)) > 2


def test_trident_cityscapes_halves_equal_official(seg_split, voc):
    img = image(45, 100)
    ev = seg_split.extract(img, voc)
    assert len(ev.meta["sam_parts"]) == 2
    p = tparams(cos_fac=0.8, bg_threshold=0.05)
    want_probs, want, _, _ = trident_official(seg_split, img, p, split=True)
    assert (seg_split.decode_probs(ev, p) - want_probs).abs().max().item() < 1e-4
    assert np.array_equal(seg_split.decode(ev, p), want[0].numpy())


@pytest.mark.parametrize("coarse,area,iou", [(0.2, 4, -1.0), (0.0, 0, -1.0), (0.3, 10, 0.0)])
def test_refinement_equals_official(seg, voc, coarse, area, iou):
    img = image(45, 70, seed=5)
    ev = seg.extract(img, voc)
    p = tparams(sam_refine=True, coarse_thresh=coarse, minimal_area=area, sam_iou_thresh=iou,
                sam_mask_coff=0.5, bg_threshold=0.05)
    probs, pred, predictor, num_cls = trident_official(seg, img, p)
    want, _ = sam_refinement_official(img, pred, probs, num_cls, predictor, coarse, area,
                                      0.5, iou)
    want = want[0].numpy()
    # the same CLIP labels and probabilities in: the same labels out, bit for bit (SAM's prompt
    # encoder and mask decoder from the decode head, the embedding from the evidence)
    from methods.clipseg.sam_refine import sam_refinement

    ours = sam_refinement(pred[0], probs.detach(), seg.refine_sam(), ev.tensors["sam.embedding"],
                          ev.meta["sam_input_size"], ev.meta["sam_original_size"], p)
    assert np.array_equal(ours.numpy(), want)
    # end to end: decode's probabilities differ from the transcription's by ~1e-6, which can
    # move a pixel of a SAM mask boundary (logit ~ 0)
    got = seg.decode(ev, p)
    assert (got == want).mean() >= 0.995
    plain = seg.decode(ev, {**p, "sam_refine": False})
    assert np.array_equal(plain, pred[0].numpy())
    if iou < 0:                               # every mask kept: the refinement changes labels
        assert (got != plain).mean() > 0.01


def test_failed_regions_never_change_the_label_map(seg, voc):
    """Masks below sam_iou_thresh: Trident's map_failed_regions changes only its probabilities
    (the official code keeps them, ours leaves them out; the labels agree above)."""
    img = image(45, 70, seed=5)
    p = tparams(sam_refine=True, coarse_thresh=0.2, minimal_area=4, sam_mask_coff=0.5,
                bg_threshold=0.05)
    probs, pred, predictor, num_cls = trident_official(seg, img, p)
    from segment_anything import SamPredictor  # noqa: F401

    ious = []
    orig = predictor.predict_torch

    def spy(*a, **k):
        out = orig(*a, **k)
        ious.extend(out[1][:, 0].tolist())
        return out

    predictor.predict_torch = spy
    sam_refinement_official(img, pred, probs, num_cls, predictor, 0.2, 4, 0.5, -1.0)
    thresh = float(np.median(ious))           # about half of the masks fail
    want, _ = sam_refinement_official(img, pred, probs, num_cls, predictor, 0.2, 4, 0.5,
                                      thresh)
    ev = seg.extract(img, voc)
    from methods.clipseg.sam_refine import sam_refinement

    ours = sam_refinement(pred[0], probs.detach(), seg.refine_sam(), ev.tensors["sam.embedding"],
                          ev.meta["sam_input_size"], ev.meta["sam_original_size"],
                          {**p, "sam_iou_thresh": thresh})
    assert np.array_equal(ours.numpy(), want[0].numpy())
    assert 0.2 < np.mean(np.array(ious) > thresh) < 0.8


def test_every_trident_knob_changes_the_output(seg, voc):
    img = image(45, 70, seed=5)
    ev = seg.extract(img, voc)
    base = seg.decode_probs(ev, tparams(beta=1.0))
    for kw in ({"beta": 0.8}, {"gamma": 6.0}, {"cos_fac": 0.2}, {"vision": "d4"},
               {"logit_scale": 70.0}):
        assert (seg.decode_probs(ev, tparams(**{"beta": 1.0, **kw})) - base).abs().max() > 1e-3, kw
    neg = tparams(cos_fac=-2.0)
    assert (seg.decode_probs(ev, neg) - seg.decode_probs(ev, {**neg, "refine_neg_cos": False})
            ).abs().max() > 1e-3
    ref = tparams(sam_refine=True, coarse_thresh=0.1, minimal_area=4, sam_iou_thresh=-1.0,
                  bg_threshold=0.05)
    a = seg.decode(ev, ref)
    for kw in ({"coarse_thresh": 0.3}, {"minimal_area": 60}, {"sam_iou_thresh": 5.0}):
        assert (seg.decode(ev, {**ref, **kw}) != a).any(), kw


def test_trident_needs_sam_and_the_patch_grid():
    from methods.clipseg.second import check_plan

    st = {**SETTINGS, "pad_to": None}
    space = {"attention": {"type": "categorical", "choices": ["trident"]}}
    check_plan(TINY_CLIP, st, {"attention": "trident"}, space)
    with pytest.raises(OvssError, match="settings.sam"):
        check_plan(TINY_CLIP, {**st, "sam": None}, {}, space)
    with pytest.raises(OvssError, match="multiples"):
        check_plan(TINY_CLIP, {**st, "window": 60, "vision": ["d8"]}, {}, space)
    with pytest.raises(OvssError, match="align"):
        check_plan(TINY_CLIP, {**st, "align": None}, {}, space)


@pytest.mark.parametrize("size", [(56, 87), (40, 61), (64, 64), (33, 100), (57, 57)])
def test_aligned_size_is_preprocess_image(size):
    from methods.clipseg.trident import aligned_size

    x = torch.zeros(1, 3, *size)
    assert aligned_size(*size, 8, 56) == tuple(preprocess_image(x, 8, 56).shape[-2:])


# --- a search over cra, proxyclip and trident, its export, inference of each exported variant
@pytest.mark.slow
@pytest.mark.ready_store
def test_smoke_second_search_samples_the_new_variants_exports_and_infers(ray_session, workdir):
    import yaml
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from methods.infer import main as infer_main
    from search.export import main as export_main
    from search.run import main as run_main

    # seeded random sampling: which variants and vision models 16 trials reach must not depend on
    # the order trials end in (TPE's later samples do: a loaded machine once sampled no trident);
    # seed 1's draws hold every variant, and both vision models among the non-cra trials
    assert run_main(["--method", "clipseg", "--preset", "smoke_second", "--num-samples", "16",
                     "--sampler", "random", "--seed", "1"]) == 0
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = [e for e in client.search_experiments() if e.name.startswith("clipseg/")][0]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    assert len(trials) >= 16 and {t.info.status for t in trials} == {"FINISHED"}
    sampled = {t.data.params.get("attention") for t in trials}
    visions = {t.data.params.get("vision") for t in trials
               if t.data.params.get("attention") != "cra"}
    assert {"proxyclip", "trident"} <= sampled, sampled
    assert visions == {"tiny-dino", "tiny-dinov2-reg"}, visions
    out = workdir / "tuned.yaml"
    assert export_main(["--method", "clipseg", "--tracking-uri", uri, "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["settings"]["vision"] == ["tiny-dino", "tiny-dinov2-reg"]
    image = sorted((workdir / ".ovss" / "smoke" / "voc21" / "JPEGImages").iterdir())[0]
    for variant, refine in (("proxyclip", False), ("trident", False), ("trident", True)):
        one = workdir / f"tuned-{variant}-{refine}.yaml"
        one.write_text(yaml.safe_dump({**cfg, "params": {
            **cfg["params"], "attention": variant, "sam_refine": refine,
            "sam_iou_thresh": 0.0}}))
        png = workdir / f"pred-{variant}-{refine}.png"
        assert infer_main(["--config", str(one), "--image", str(image), "--classes",
                           "cat,dog,person", "--out", str(png)]) == 0
        pred = np.array(Image.open(png))
        assert pred.shape == Image.open(image).size[::-1] and pred.max() <= 3



def test_a_trial_worker_decodes_trident_and_refines_from_the_decode_head(seg, voc):
    """From the decode head alone (what a trial worker builds): the same labels, with and without
    the refinement, and neither CLIP nor any vision model nor SAM's image encoder is built."""
    from methods.deferred import Deferred

    img = image(45, 70, seed=5)
    ev = seg.extract(img, voc)
    worker = type(seg).from_decode_state(TINY_CLIP, seg.settings, seg.decode_state())
    for refine in (False, True):
        p = tparams(sam_refine=refine, coarse_thresh=0.2, minimal_area=4, sam_iou_thresh=-1.0,
                    sam_mask_coff=0.5, bg_threshold=0.05)
        assert np.array_equal(worker.decode(ev, p), seg.decode(ev, p))
    assert not worker.model_built
    assert all(isinstance(m, Deferred) for m in worker._vision.values())
    assert not list(worker.refine_sam().image_encoder.parameters())
