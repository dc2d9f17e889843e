"""FSeg-LLaVA on tiny LLaVA-1.5 / 1.6 + tiny SAM: the SAM memo, no background and no yes, the
cached QA prefix against ``generate``, batched class passes, loading errors, SAM's embedding
decoder against its predictor. (The formulas, prompts and QAP bookkeeping: tests/test_fseg.py;
decode(extract) against the straight pipeline: tests/test_fseg_reference.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import ClassSet, OvssError
from methods.fseg.qap import answer_tokens, is_yes
from methods.spec import load_method_spec
from search.core.config import resolve

SPEC = load_method_spec("fseg")
RNG = np.random.default_rng(0)


# --- the model path -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_segs():
    from methods.fseg import SEGMENTER

    out = {}
    for name in ("tiny", "tiny-next"):
        r = resolve(SPEC, backbone=name, dataset="voc21")
        settings = {**r.settings, "evidence_dtype": "float32", "max_new_tokens": 6,
                    "grid": "highres" if name == "tiny-next" else "base"}
        out[name] = (SEGMENTER.from_spec(r.backbone, settings), r.defaults)
    return out


CLASSES = ClassSet.from_names(["cat", "dog", "potted plant"], background=True)
VARIANT = {"attn_layers": "range", "entropy": "mass_2mean", "prompt": "points", "K": 1,
           "merge": "score", "upsample": "argmax_then_nearest", "multimask": True,
           "pool": "last", "alpha": 0.3, "kernel_tokens": 0.25, "snap_centroid": True,
           "image_mass": "none", "skip_layers": 1}


def test_sam_memo_reuses_equal_prompts_and_changes_nothing(tiny_segs):
    seg, defaults = tiny_segs["tiny"]
    image = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ev = seg.extract(image, CLASSES, [1, 3])
    seg._sam_memo.clear()
    first = seg.decode(ev, defaults)
    hits = seg.sam_memo_hits
    again = seg.decode(ev, {**defaults, "merge": "order"})     # same prompts, other merge rule
    assert seg.sam_memo_hits > hits                             # SAM was not run again
    seg._sam_memo.clear()
    assert np.array_equal(seg.decode(ev, {**defaults, "merge": "order"}), again)
    assert np.array_equal(seg.decode(ev, defaults), first)
    other = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # another image: its own entries
    n = len(seg._sam_memo)
    seg.decode(seg.extract(other, CLASSES, [1, 3]), defaults)
    assert len(seg._sam_memo) > n


def test_no_background_dataset_and_no_yes(tiny_segs):
    seg, defaults = tiny_segs["tiny"]
    image = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    classes = ClassSet.from_names(["cat", "dog", "sky"])
    ev = seg.extract(image, classes, [0, 2])
    got = seg.decode(ev, defaults)
    assert set(np.unique(got)) <= {0, 2}                          # every pixel: a yes-class
    ev = seg.extract(image, classes, [])
    assert ev.meta["yes"] == [] and not seg.decode(ev, defaults).any()


def test_model_qa_uses_cached_prefix_like_generate(tiny_segs):
    from methods.fseg.qap import prefix_ids, question_ids

    seg, _ = tiny_segs["tiny"]
    seg.settings["qa"] = "model"
    try:
        image = RNG.integers(0, 256, (24, 30, 3), dtype=np.uint8)
        ev = seg.extract(image, CLASSES, None)
    finally:
        seg.settings["qa"] = "auto"
    assert ev.meta["qa"] == "model"
    from methods.fseg.llava_pass import pixel_inputs
    llava, tok = seg.llava, seg.llava.tokenizer
    inputs, _ = pixel_inputs(llava, image, True)
    prefix = prefix_ids(tok, llava.template, llava.image_token_id, 64)
    for c in CLASSES.foreground:
        ids = torch.tensor([prefix + question_ids(tok, llava.template, CLASSES.names[c])])
        out = llava.model.generate(input_ids=ids, **inputs, do_sample=False, max_new_tokens=6,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert ev.meta["answers"][str(c)] == text and text
    assert ev.meta["yes"] == [c for c in CLASSES.foreground if is_yes(ev.meta["answers"][str(c)])]
    with pytest.raises(OvssError, match="present"):
        seg.settings["qa"] = "present"
        try:
            seg.extract(image, CLASSES, None)
        finally:
            seg.settings["qa"] = "auto"


# --- loading errors -------------------------------------------------------------------------------
def test_loading_errors(tmp_path):
    from methods.fseg import SEGMENTER
    from methods.fseg.sam import SAM_SIZES, build_sam, load_sam

    base = {"name": "x", "arch": "llava", "model": "some/model", "sam": "vit_b",
            "sam_checkpoint": str(tmp_path / "missing.pth")}
    with pytest.raises(OvssError, match="missing.pth"):
        SEGMENTER.from_spec(base, {})
    ckpt = tmp_path / "sam_tiny.pth"
    torch.manual_seed(3)
    torch.save(build_sam(**SAM_SIZES["tiny"]).state_dict(), ckpt)
    sam = load_sam({"sam": "tiny", "sam_checkpoint": str(ckpt)}, seed=0, device="cpu")
    assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"],
                       torch.load(ckpt, weights_only=True)["mask_decoder.iou_token.weight"])
    with pytest.raises(OvssError, match="as vit_b"):
        load_sam({"sam": "vit_b", "sam_checkpoint": str(ckpt)}, seed=0, device="cpu")
    ok_sam = {"sam": "tiny", "sam_checkpoint": str(ckpt)}
    with pytest.raises(OvssError, match="arch must be one of"):
        SEGMENTER.from_spec({**base, **ok_sam, "arch": "blip"}, {})
    with pytest.raises(OvssError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        SEGMENTER.from_spec({**base, **ok_sam, "path": str(tmp_path / "empty")}, {})
    with pytest.raises(OvssError, match="sam must be one of"):
        SEGMENTER.from_spec({**base, "sam": "vit_x"}, {})
    with pytest.raises(OvssError, match="unknown setting"):
        SEGMENTER.from_spec({"name": "tiny", "tiny": {}, "sam": "tiny"}, {"bogus": 1})


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_batched_class_passes_equal_one_pass_per_class(tiny_segs, name):
    """Rows of different lengths share one pass (right padding); each row's maps equal its own
    single-class pass, and the shared prefix cache is left as it was."""
    from methods.fseg.llava_pass import PrefixRunner, encode_image
    from methods.fseg.qap import canonical_answer

    seg, _ = tiny_segs[name]
    s = seg.settings
    image = RNG.integers(0, 256, (36, 50, 3), dtype=np.uint8)
    tokens = encode_image(seg.llava, image, bool(s["pad_to_square"]), s["grid"],
                          s["vgm_features"], "cpu")
    runner = PrefixRunner(seg.llava, tokens, "cpu")
    names = ["potted plant", "cat", "dog"]
    items = [(n, answer_tokens(seg.llava.tokenizer, canonical_answer(n), n)) for n in names]
    assert len({len(a.ids) + len(n) for n, a in items}) > 1       # rows really differ in length
    length = runner.cache.get_seq_length()
    batched = runner.analyse_many(items, batch=3)
    assert runner.cache.get_seq_length() == length
    for (n, ans), (cos, attn) in zip(items, batched):
        cos1, attn1 = runner.analyse(n, ans)
        assert cos.shape == cos1.shape and attn.shape == attn1.shape
        torch.testing.assert_close(cos, cos1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attn, attn1, rtol=1e-4, atol=1e-6)
    assert [c.shape for c, _ in runner.analyse_many(items, batch=2)] == \
        [c.shape for c, _ in batched]


def test_argmax0_is_first_max_argmax():
    from methods.fseg.formulas import argmax0

    stack = torch.from_numpy(RNG.integers(0, 3, (4, 9, 11)).astype(np.float32))  # many ties
    assert torch.equal(argmax0(stack), stack.argmax(0))
    assert torch.equal(argmax0(stack[:1]), torch.zeros(9, 11, dtype=torch.int64))


@pytest.mark.parametrize("depth", [1, 2])
def test_embedding_decoder_equals_sam_predictor(depth):
    """The cached-embedding decoder gives SamPredictor.predict's mask and score bit for bit."""
    from segment_anything import SamPredictor

    from methods.fseg.sam import SAM_SIZES, EmbeddingDecoder, build_sam, image_embedding

    torch.manual_seed(depth)
    sam = build_sam(**{**SAM_SIZES["tiny"], "decoder_depth": depth})
    pred = SamPredictor(sam)
    image = RNG.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    emb, input_size = image_embedding(pred, image)
    dec = EmbeddingDecoder(SamPredictor(sam), emb.clone(), input_size, (45, 70))
    for trial in range(6):
        pts = RNG.uniform(0, [70, 45], (int(RNG.integers(1, 4)), 2))
        box = np.array([5.0, 4.0, 60.0, 40.0]) + RNG.uniform(-3, 3, 4)
        points, bx = [(pts, None), (None, box), (pts, box)][trial % 3]
        multimask = trial < 3
        masks, scores, _ = pred.predict(
            point_coords=points, box=bx, multimask_output=multimask,
            point_labels=None if points is None else np.ones(len(points), dtype=np.int64))
        best = int(np.argmax(scores)) if multimask else 0
        mask, score = dec(points, bx, multimask)
        assert mask.dtype == bool and mask.shape == (45, 70)
        assert np.array_equal(mask, masks[best]) and score == float(scores[best])
