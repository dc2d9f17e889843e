"""ProxyCLIP (``attention: proxyclip``) and the second vision model, against a direct
transcription of the official code written here without our formula functions:
mc-lan/ProxyCLIP e7b767f ``open_clip/transformer.py`` 503-587 (sequence-first tokens, heads
folded into the batch, ``torch.bmm``), ``proxyclip_segmentor.py`` 106-292 (re-normalisation,
sliding windows padded to 56, post-processing), facebookresearch/dino 7c446df
``vision_transformer.py`` (DINO's blocks and ``interpolate_pos_encoding``) and dinov2
``vision_transformer.py`` (registers), on random-weight real classes (open_clip CLIP with 4
heads, transformers' ViTModel / Dinov2WithRegistersModel with 4 heads, segment-anything's Sam)
with randomised biases and LayerNorm gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import OvssError
from methods.clipseg import SEGMENTER
from tests.proxyclip_official import dino_official, dinov2_official, official_probs
from tests.second_models import (
    SETTINGS,
    TINY_CLIP,
    VISION,
    build,
    image,
    params,
    voc_classes,
)


@pytest.fixture(scope="module")
def seg():
    return build(SETTINGS)


@pytest.fixture(scope="module")
def voc():
    return voc_classes()


# --- the tests ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_padded():
    return build({**SETTINGS, "short_side": 47})      # 47 px high windows, padded to 56


@pytest.mark.parametrize("vision", ["dino", "reg", "sam"])
@pytest.mark.parametrize("padded", [False, True])
def test_proxyclip_equals_official(seg, seg_padded, voc, vision, padded):
    seg = seg_padded if padded else seg
    img = image(56, 97) if not padded else image(40, 64)
    ev = seg.extract(img, voc)
    p = params(vision=vision, beta=1.1, gamma=2.5, bg_threshold=0.05)
    want_probs, want = official_probs(seg, img, p)
    got_probs = seg.decode_probs(ev, p)
    assert (got_probs - want_probs).abs().max().item() < 1e-4
    got = seg.decode(ev, p)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) > 2


def test_short_side_smaller_than_the_window_pads_centred(seg_padded):
    # short side 47 < window 56: every window is 47 px high, padded 4 above and 5 below
    grid = seg_padded.window_grid(tuple(seg_padded.preprocess(image(40, 64)).shape[1:]))
    assert (grid.wh, grid.ph, grid.top, grid.ww, grid.left) == (47, 56, 4, 56, 0)


def test_dino_positional_interpolation_is_dinos(seg):
    vfm = seg.vision("dino")
    x = torch.randn(2, 3, 96, 72)                            # 12 x 9 patches, native 7 x 7
    ours = vfm.features(x)
    want = dino_official(vfm.module, x)[:, 1:].reshape(2, 12, 9, -1).permute(0, 3, 1, 2)
    assert (ours - want).abs().max().item() < 1e-5
    hf = vfm.module(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert (hf[:, 1:].reshape(2, 12, 9, -1).permute(0, 3, 1, 2) - want).abs().max() > 1e-4


def test_dinov2_registers_are_dropped_and_positions_official(seg):
    vfm = seg.vision("reg")
    x = torch.randn(2, 3, 64, 48)
    assert (vfm.features(x) - dinov2_official(vfm.module, x)).abs().max().item() < 1e-5


def test_all_masked_rows_keep_their_maximum_instead_of_nan(seg, voc):
    """beta mean S >= 1: the official softmax of a row of -inf is NaN; ours attends to the
    token itself (S_ii = 1 is the row maximum), i.e. each token keeps its own value."""
    img = image(56, 97)
    ev = seg.extract(img, voc)
    p = params(beta=50.0)
    official, _ = official_probs(seg, img, p)
    assert torch.isnan(official).all()
    got = seg.decode_probs(ev, p)
    assert torch.isfinite(got).all()
    from methods.clipseg.packing import unpack_symmetric
    from methods.clipseg.proxy import proxy_attention

    sim = unpack_symmetric(ev.tensors["proxy.sim.dino"], 49)
    eye = torch.eye(sim.shape[-1]).expand_as(sim)
    assert torch.allclose(proxy_attention(sim, 50.0, 3.0), eye)
    # the limit: identity attention is out_proj(up(V)) = up(U) token by token
    from methods.clipseg.proxy import resize_to_cells

    up = resize_to_cells(ev.tensors["proxy.values"], tuple(ev.meta["grid"][2:]), (7, 7))
    cos = seg.features(up) @ ev.tensors["text"].float().T
    want = seg.decode_probs(ev, p)
    from methods.clipseg.labels import names_to_classes, upsample
    from methods.clipseg.windows import mosaic

    logits = upsample(mosaic(cos * 40.0, *ev.meta["grid"][:2], 7, 7),
                      ev.tensors["proxy.rows.dino"], ev.tensors["proxy.cols.dino"])
    limit = names_to_classes(torch.softmax(logits, 1).permute(1, 0, 2), ev.meta["name_class"])
    assert (want - limit).abs().max().item() < 1e-5
    # a row with an entry kept is the official row
    p2 = params(beta=1.0)
    ok, _ = official_probs(seg, img, p2)
    assert (seg.decode_probs(ev, p2) - ok).abs().max().item() < 1e-4


def test_every_knob_changes_the_output(seg, voc):
    img = image(56, 97)
    ev = seg.extract(img, voc)
    base = seg.decode_probs(ev, params())
    for kw in ({"beta": 0.9}, {"gamma": 6.0}, {"logit_scale": 70.0}, {"vision": "reg"},
               {"vision": "sam"}):
        assert (seg.decode_probs(ev, params(**kw)) - base).abs().max() > 1e-3, kw
    a, b = seg.decode(ev, params(bg_threshold=0.0)), seg.decode(ev, params(bg_threshold=0.5))
    assert (a != b).any()


def test_evidence_holds_u_and_the_features_keyed_by_the_vision_settings(seg, voc):
    img = image(56, 97)
    ev = seg.extract(img, voc)
    assert set(ev.meta["proxy_cells"]) == {"dino", "reg", "sam"}
    assert ev.meta["proxy_cells"]["sam"] == [8, 8] and ev.meta["proxy_cells"]["dino"] == [7, 7]
    assert "key_gram" not in ev.tensors and "fixed_cos" not in ev.tensors  # variants: proxyclip
    key = seg.settings_key()
    assert key["vision_models"]["dino"] == VISION["dino"] and key["vision"] == ["dino", "reg",
                                                                             "sam"]
    with pytest.raises(OvssError, match="not extracted"):
        seg.decode(ev, params(vision="other"))
    with pytest.raises(OvssError, match=r"extracted for \['proxyclip'\] only"):
        seg.decode(ev, params(attention="cra"))


def test_a_vision_model_that_does_not_exist_is_one_line():
    with pytest.raises(OvssError, match="'nosuch' is not in settings.vision_models"):
        SEGMENTER.from_spec(TINY_CLIP, {**SETTINGS, "vision": ["nosuch"]})
    with pytest.raises(OvssError, match="arch must be one of"):
        SEGMENTER.from_spec(TINY_CLIP, {**SETTINGS, "vision": ["x"],
                                        "vision_models": {"x": {"arch": "mae", "tiny": {}}}})


def test_features_instead_of_similarities_decode_alike(seg, voc, monkeypatch):
    """A vision model whose S would be much larger than its features keeps F (SAM ViT-B: 4096
    tokens, 256 channels); both decode to the same probabilities."""
    import methods.clipseg.second as second

    assert second.stores_similarity(1764, 768) and not second.stores_similarity(4096, 256)
    img = image(56, 97)
    ev = seg.extract(img, voc)
    monkeypatch.setattr(second, "stores_similarity", lambda tokens, channels: False)
    ev_f = seg.extract(img, voc)
    assert "proxy.feat.sam" in ev_f.tensors and "proxy.sim.sam" not in ev_f.tensors
    assert "proxy.sim.sam" in ev.tensors
    for vision in ("dino", "sam"):
        p = params(vision=vision)
        assert (seg.decode_probs(ev_f, p) - seg.decode_probs(ev, p)).abs().max() < 1e-5



def test_pamr_refines_proxyclip_as_the_straight_forward(seg, voc):
    """pamr_steps > 0 refines proxyclip's logits at the original size before the logit scale,
    as the straight forward (reference.py, NACLIP's placement) does, and changes them."""
    from methods.clipseg.reference import full_forward_probs

    img = image(56, 97, seed=3)
    ev = seg.extract(img, voc)
    p = params(pamr_steps=3, pamr_dilations="1,2", bg_threshold=0.05)
    got = seg.decode_probs(ev, p)
    assert (got - full_forward_probs(seg, img, voc, p)).abs().max().item() < 1e-4
    assert (got - seg.decode_probs(ev, {**p, "pamr_steps": 0})).abs().max().item() > 1e-3


def test_variants_null_serves_what_the_vision_settings_can():
    """settings.variants null: the family's variants plus proxyclip with settings.vision, plus
    trident with settings.sam too; listing one the settings cannot serve is one line."""
    from methods.clipseg.second import check_settings, served
    from methods.clipseg.variants import FAMILY, check_variants

    base = {"vision_models": VISION}
    assert check_variants(None, served(base)) == FAMILY
    assert check_variants(None, served({**base, "vision": ["dino"]})) == (*FAMILY, "proxyclip")
    both = {**base, "vision": ["dino"], "sam": "sam"}
    assert check_variants(None, served(both)) == (*FAMILY, "proxyclip", "trident")
    with pytest.raises(OvssError, match="lists trident, which needs settings.vision and "
                                        "settings.sam"):
        check_settings({**base, "vision": ["dino"]}, ("cra", "trident"))
