"""PAMR (methods/pamr.py) against a direct transcription of the official module
(visinf/1-stage-wseg d905fca models/mods/pamr.py: shift kernels run by ``conv2d`` with
replicate padding, written here without our functions), and clipseg's PAMR step against
NACLIP's placement (naclip.py 126-132): on the cosines of all names at the original size,
before the logit scale, guided by the normalised network input resized to that size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError
from methods.clipseg import SEGMENTER
from methods.clipseg.labels import names_to_classes
from methods.pamr import local_affinity, pamr, parse_dilations, refine

POS8 = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]


# --- the official module (pamr.py 10-143), transcribed ------------------------------------------
def _kernel(kind: str) -> torch.Tensor:
    if kind == "std":                                   # LocalStDev: all 9 positions
        w = torch.zeros(9, 1, 3, 3)
        for i in range(9):
            w[i, 0, i // 3, i % 3] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    for i, (a, b) in enumerate(POS8):
        if kind == "abs":                               # LocalAffinity: centre - neighbour
            w[i, 0, 1, 1] = 1
            w[i, 0, a, b] = -1
        else:                                           # LocalAffinityCopy: the neighbour
            w[i, 0, a, b] = 1
    return w


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    b, k, h, w = x.size()
    x = x.view(b * k, 1, h, w)
    out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, 1).view(b, k, -1, h, w)


def official_pamr(x: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations) -> torch.Tensor:
    """PAMR.forward: x B x K x H x W image, mask B x C x h x w."""
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = _local(x, _kernel("std"), dilations).std(2, keepdim=True)
    x = -_local(x, _kernel("abs"), dilations).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        m = _local(mask, _kernel("copy"), dilations)
        mask = (m * x).sum(2)
    return mask


@pytest.mark.parametrize("steps,dilations,size", [
    (10, (8, 16), (37, 45)),             # NACLIP's
    (3, (1, 2, 4, 8, 12, 24), (30, 52)),  # the original paper's dilations
    (1, (1,), (9, 11)),
    (2, (40,), (21, 17)),                 # a dilation beyond the image: all replicate
])
def test_pamr_equals_the_official_module(steps, dilations, size):
    gen = torch.Generator().manual_seed(steps)
    img = torch.randn(1, 3, *size, generator=gen) * torch.tensor([1.0, 3.0, 0.2])[:, None, None]
    masks = torch.randn(1, 5, *size, generator=gen)
    want = official_pamr(img, masks, steps, list(dilations))[0]
    got = pamr(img[0], masks[0], steps, dilations)
    assert (got - want).abs().max().item() < 1e-5
    assert (want - masks[0]).abs().max().item() > 0.5           # PAMR changed the masks
    # the affinity is a softmax over the 8 |D| neighbours
    w = local_affinity(img[0], dilations)
    assert w.shape == (8 * len(dilations), *size)
    assert torch.allclose(w.sum(0), torch.ones(size), atol=1e-5)


def test_refine_in_chunks_equals_all_at_once(monkeypatch):
    import methods.pamr as mod

    gen = torch.Generator().manual_seed(1)
    img, masks = torch.randn(3, 20, 24, generator=gen), torch.randn(7, 20, 24, generator=gen)
    w = local_affinity(img, (2, 4))
    whole = refine(masks, w, (2, 4), 4)
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 2 * 20 * 24)      # 2 channels at a time
    assert torch.equal(refine(masks, w, (2, 4), 4), whole)
    assert torch.allclose(refine(3.0 * masks, w, (2, 4), 4), 3.0 * whole, atol=1e-5)  # linear


def test_per_channel_affine_image_changes_nothing():
    """Why the guide's normalisation (ours: open_clip's mean / std; NACLIP: mmseg's) does not
    matter: |a I_p - a I_q| / (0.1 sigma(a I)) is scale-free, up to the 1e-8."""
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(3, 25, 31, generator=gen)
    a, b = torch.tensor([2.0, 0.5, 7.0])[:, None, None], torch.tensor([-1.0, 3.0, 0.2])[:, None,
                                                                                         None]
    assert torch.allclose(local_affinity(img, (1, 3)), local_affinity(a * img + b, (1, 3)),
                          atol=1e-5)


def test_bad_pamr_knobs_raise():
    assert parse_dilations("8,16") == (8, 16) and parse_dilations(" 4 ") == (4,)
    for bad in ("", " , ", "8,0", "-2", "a,b"):
        with pytest.raises(OvssError, match="pamr_dilations"):
            parse_dilations(bad)
    with pytest.raises(OvssError, match="pamr_steps"):
        pamr(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), -1, (1,))


# --- clipseg: PAMR where NACLIP applies it ------------------------------------------------------
TINY = {"name": "tiny4", "tiny": {"width": 64, "layers": 4, "heads": 4, "patch_size": 8,
                                  "image_size": 32}}
#: NACLIP's data preprocessor (naclip.py 24: mmseg mean / std on 0..255, RGB after the flip).
MMSEG_MEAN = torch.tensor([122.771, 116.746, 104.094])[:, None, None]
MMSEG_STD = torch.tensor([68.501, 66.632, 70.323])[:, None, None]


@pytest.fixture(scope="module")
def naclip_seg():
    from tests.test_clipseg_family import randomise

    settings = {"protocol": "naclip", "short_side": 48, "window": 32, "stride": 16,
                "templates": "simple", "evidence_dtype": "float32"}
    s = SEGMENTER.from_spec(TINY, settings)
    randomise(s.model)
    return type(s)(s.model, s.model_name, TINY, settings)


def test_decode_applies_pamr_where_naclip_does(naclip_seg):
    from methods.clipseg.reference import full_forward_labels, full_forward_probs
    from tests.test_clipseg_family import params
    from tests.test_contract import structured_image

    s = naclip_seg
    img = structured_image((41, 58), seed=4)
    classes = ClassSet.from_names(["cat", "dog", "tree", "sky"], background=True)
    ev = s.extract(img, classes)
    scale = float(s.settings["logit_scale"])
    off = params(attention="naclip")
    # background below the median best probability: half the pixels, so labels can change
    off["bg_threshold"] = float(s.decode_probs(ev, off).amax(0).median())
    on = {**off, "pamr_steps": 10, "pamr_dilations": "8,16"}
    cos = s.scaled_logits(ev, off).permute(1, 0, 2) / scale             # names x H x W
    # NACLIP: img = interpolate(inputs, ori_shape, bilinear); pamr(img, seg_logits); x scale
    net_input = torch.from_numpy(s.resized(img)).permute(2, 0, 1).float()
    net_input = (net_input - MMSEG_MEAN) / MMSEG_STD
    guide = F.interpolate(net_input[None], size=img.shape[:2], mode="bilinear",
                          align_corners=False)
    refined = official_pamr(guide, cos[None], 10, [8, 16])[0]
    want = names_to_classes(torch.softmax(scale * refined, 0), ev.meta["name_class"])
    got = s.decode_probs(ev, on)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - s.decode_probs(ev, off)).abs().max().item() > 0.05   # PAMR did something
    labels_on, labels_off = s.decode(ev, on), s.decode(ev, off)
    assert (labels_on != labels_off).mean() > 0.01
    # and the straight pipeline (one full forward per configuration) agrees
    assert (full_forward_probs(s, img, classes, on) - got).abs().max().item() < 1e-4
    assert np.array_equal(full_forward_labels(s, img, classes, on), labels_on)
    # steps and dilations both matter
    other = s.decode_probs(ev, {**on, "pamr_dilations": "1,2"})
    fewer = s.decode_probs(ev, {**on, "pamr_steps": 2})
    assert (other - got).abs().max() > 1e-3 and (fewer - got).abs().max() > 1e-3
