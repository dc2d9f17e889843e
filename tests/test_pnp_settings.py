"""PnP-OVSS settings that change what the model sees: the drop fill (the tiny models must see
pixels), the last layer's empty maps, the reference's all-classes prompt and class names, the
[ENC] fallback warning, the presence source, and D = 1 skipping ``extend`` in a search."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from methods.base import ClassSet, OvssError
from methods.pnp import SEGMENTER
from methods.pnp.reference import (
    drop_chain_maps,
    naive_segment,
    single_head_gradcam,
    word_piece_means,
)
from methods.spec import load_method_spec
from search.core.config import resolve
from tests.test_pnp import CLASSES, PRESENT, SETTINGS, TINY, params

KNOBS = {"layer": 1, "head": 2, "drop_iters": 3}


@pytest.fixture(scope="module", params=["blip", "bridgetower"])
def seg(request):
    return SEGMENTER.from_spec({"name": "tiny", "arch": request.param, "tiny": TINY}, SETTINGS)


def variant(seg, **settings):
    """The same model with other settings (no reload)."""
    return SEGMENTER(seg.vlm, {"name": "tiny", "tiny": TINY}, {**SETTINGS, **settings})


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (4, 6, 3)).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None],
                                          size=(48, 64), mode="bilinear", align_corners=False)
    return img[0].permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# --- the tiny models see pixels -------------------------------------------------------------------
def test_drop_fill_is_the_reference_mean_colour_and_it_matters(seg, image):
    """Our chain equals the reference's, whose fill (0 after normalisation) is written out in
    reference.py: a changed fill breaks the equality. The black fill must change the maps."""
    ev = seg.extract(image, CLASSES, PRESENT)
    ours = seg.extend(ev, image, CLASSES, PRESENT, KNOBS).tensors["chain"].flatten(-2)
    ref = torch.stack(drop_chain_maps(seg, image, CLASSES, PRESENT, **KNOBS)[1:])
    assert rel(ours, ref) < 1e-5
    black = variant(seg, drop_fill="black")
    other = black.extend(ev, image, CLASSES, PRESENT, KNOBS).tensors["chain"].flatten(-2)
    assert rel(other, ours) > 0.02                       # the fill changes the maps
    ref_black = torch.stack(drop_chain_maps(black, image, CLASSES, PRESENT, **KNOBS)[1:])
    assert rel(other, ref_black) < 1e-5
    assert torch.equal(seg.fill_value(), torch.zeros(3))


def test_the_image_changes_every_layers_maps(seg, image):
    ev = seg.extract(image, CLASSES, PRESENT)
    flipped = seg.extract(np.ascontiguousarray(image[:, ::-1]), CLASSES, PRESENT)
    for layer in range(seg.vlm.layers - 1):
        assert rel(flipped.tensors["maps"][layer], ev.tensors["maps"][layer]) > 0.05


# --- layer L: empty by construction ---------------------------------------------------------------
def test_last_layer_maps_are_empty(seg, image):
    """Only the first text row reaches the ITM head from the last layer, so each class row's
    gradient there is exactly 0 (the reference pass too): the space leaves that layer out."""
    ev = seg.extract(image, CLASSES, PRESENT)
    last = seg.vlm.layers - 1
    assert not ev.tensors["maps"][last].any()
    assert ev.tensors["maps"][last - 1].abs().amax() > 0
    prompt = seg.prompt(CLASSES, PRESENT)
    ref = single_head_gradcam(seg, seg.preprocess(image), prompt, last, 0)
    assert not ref[list(prompt.class_rows)].any()
    lab = seg.decode(ev, params(layer=last + 1, drop_iters=1))
    assert not lab.any()                                # nothing passes: all background
    spec = load_method_spec("pnp")
    for name, bb in spec.backbones.items():
        r = resolve(spec, backbone=name)
        extra = bb.model_extra or {}
        layers = (extra.get("tiny") or {}).get("layers") or (12 if extra["arch"] == "blip" else 6)
        assert r.space["layer"].high == layers - 1, name


# --- the reference's search prompt and names ------------------------------------------------------
def test_all_classes_prompt_picks_the_present_maps(seg, image):
    every = variant(seg, prompt_classes="all")
    prompt, pick = every.picked(CLASSES, PRESENT)
    assert prompt.text == "a picture of cat dog pottedplant tvmonitor" and pick == [0, 2, 3]
    ev = every.extract(image, CLASSES, PRESENT)
    assert ev.tensors["maps"].shape[2] == 3 and ev.meta["present"] == PRESENT
    pixels = every.preprocess(image)
    for layer, head in ((0, 1), (1, 0)):
        g = single_head_gradcam(every, pixels, prompt, layer, head)
        want = word_piece_means(g, [prompt.groups[1 - 1], prompt.groups[3 - 1],
                                    prompt.groups[4 - 1]])
        assert rel(ev.tensors["maps"][layer, head].flatten(-2), want) < 1e-5
    present = seg.extract(image, CLASSES, PRESENT)
    assert rel(ev.tensors["maps"][:2], present.tensors["maps"][:2]) > 1e-3   # the prompt matters
    p = params(drop_iters=3)
    ours = every.decode(ev.merged(every.extend(ev, image, CLASSES, PRESENT, KNOBS)), p)
    np.testing.assert_array_equal(ours, naive_segment(every, image, CLASSES, p, PRESENT))


def test_reference_class_names_are_a_data_set_setting(seg):
    spec = load_method_spec("pnp")
    voc = resolve(spec, backbone="tiny", dataset="voc21")
    assert voc.settings["prompt_names"] == {"diningtable": "table"}
    classes = ClassSet.from_names(["cat", "diningtable", "pottedplant"], background=True)
    named = variant(seg, prompt_names=voc.settings["prompt_names"])
    assert named.prompt(classes, [1, 2, 3]).text == "a picture of cat table pottedplant"
    assert seg.prompt(classes, [1, 2, 3]).text == "a picture of cat diningtable pottedplant"
    ade = resolve(spec, backbone="tiny", dataset="ade20k").settings["prompt_names"]
    assert ade["earth"] == "ground" and ade["ashcan"] == "trash can"
    ade_seg = variant(seg, prompt_names=ade)
    ash = ClassSet.from_names(["ashcan", "wall"])
    assert ade_seg.prompt(ash, [0, 1]).text == "a picture of trashcan wall"   # squashed
    assert resolve(spec, backbone="tiny", dataset="context59").settings["prompt_names"] == {}
    with pytest.raises(OvssError, match="prompt_names"):
        variant(seg, prompt_names={"cat": ""})
    with pytest.raises(OvssError, match="prompt_classes"):
        variant(seg, prompt_classes="some")


# --- [ENC] ----------------------------------------------------------------------------------------
def test_missing_enc_token_warns_once(seg):
    if seg.vlm.arch != "blip":
        pytest.skip("[ENC] is BLIP's")
    enc = seg.vlm.tokenizer.convert_tokens_to_ids("[ENC]")
    assert seg.vlm.enc_token_id == enc
    assert int(seg.prompt(CLASSES, PRESENT).input_ids[0, 0]) == enc
    no_enc = dataclasses.replace(seg.vlm, enc_token_id=None)
    with pytest.warns(UserWarning, match=r"no \[ENC\].*\[CLS\]"):
        SEGMENTER(no_enc, {"name": "no-enc-test"}, SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = SEGMENTER(no_enc, {"name": "no-enc-test"}, SETTINGS)         # once
        SEGMENTER(no_enc, {"name": "no-enc-other"}, {**SETTINGS, "enc_token": False})
    cls_id = seg.vlm.tokenizer.cls_token_id
    assert int(quiet.prompt(CLASSES, PRESENT).input_ids[0, 0]) == cls_id


# --- presence -------------------------------------------------------------------------------------
def test_presence_source_and_present_list_or_none(seg, image):
    with pytest.raises(OvssError, match="presence_source"):
        variant(seg, presence_source="oracle")
    calls = []
    s = variant(seg, presence_source="model")

    def tagger(img, classes):
        calls.append(1)
        return [2]

    s.presence_filter = tagger
    assert s.extract(image, CLASSES, PRESENT).meta["present"] == PRESENT and not calls
    assert s.extract(image, CLASSES, [0]).meta["present"] == [] and not calls
    assert s.extract(image, CLASSES, None).meta["present"] == [2] and calls == [1]


# --- D = 1 in a search: no extend -----------------------------------------------------------------
def test_d1_search_skips_extend(tmp_path, monkeypatch):
    from search.core.cache import EvidenceCache
    from search.core.trial import ImageItem, SearchContext, evidence_for, extract_item, get_dataset
    from search.data.synthetic import make_dataset

    root = make_dataset("voc", tmp_path / "voc", n=2, seed=1)
    spec = load_method_spec("pnp")
    r = resolve(spec, backbone="tiny", dataset="voc21", preset=spec.presets["smoke"])
    data_kw = {"name": "voc21", "root": str(root), "split": "val", "labels": "dense"}
    from search.core.cache import file_hash
    from search.data import open_dataset

    data = open_dataset(**data_kw)
    items = [ImageItem(i, str(data.ids()[i]), file_hash(data.image_path(i)),
                       tuple(data.image_labels(i))) for i in range(2)]
    ctx = SearchContext(method="pnp", backbone=r.backbone, settings=r.settings,
                        defaults=r.defaults, classes=data.classes.to_dict(), dataset=data_kw,
                        items=items, rungs=[2], reward={"name": "miou"},
                        cache_dir=str(tmp_path / "cache"),
                        extraction_knobs=tuple(SEGMENTER.extraction_knobs))
    ctx.settings_key = {"backbone": ctx.backbone, "settings": ctx.settings}
    for it in items:
        assert extract_item(ctx, it)
    files = lambda: sorted((tmp_path / "cache").rglob("*.safetensors"))  # noqa: E731
    assert len(files()) == 2
    reads = []
    ds = get_dataset(ctx)
    monkeypatch.setattr(type(ds), "image", lambda self, i: reads.append(i) or pytest.fail(
        "D = 1 read an image"))
    monkeypatch.setattr(SEGMENTER, "extend", lambda *a, **k: pytest.fail("D = 1 ran extend"))
    p = {**r.defaults, "drop_iters": 1}
    for it in items:
        ev = evidence_for(ctx, it, p)
        assert "chain" not in ev.tensors
    assert not reads and len(files()) == 2          # no image read, no empty cache entry
    monkeypatch.undo()
    ev = evidence_for(ctx, items[0], {**r.defaults, "drop_iters": 2})
    assert ev.tensors["chain"].shape[0] == 1 and len(files()) == 3
    assert EvidenceCache(tmp_path / "cache").has("pnp", ctx.base_key(items[0]))
