"""FSeg-LLaVA, issue #10: presence from the model's own QAP answers, the candidate-head guard
against sink heads, the cached question pass seeing the image (transformers ``cache=``),
de-noising sizes in token units, the SAM embedding's storage precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.base import ClassSet, Evidence, OvssError
from methods.fseg import formulas as fm
from methods.spec import load_method_spec
from search.core.config import resolve

SPEC = load_method_spec("fseg")
RNG = np.random.default_rng(10)
CLASSES = ClassSet.from_names(["cat", "dog", "potted plant"], background=True)


@pytest.fixture(scope="module")
def seg_defaults():
    from methods.fseg import SEGMENTER

    r = resolve(SPEC, backbone="tiny", dataset="voc21")
    assert r.settings["presence_source"] == "model" and r.settings["qa"] == "auto"
    settings = {**r.settings, "max_new_tokens": 24}
    return SEGMENTER.from_spec(r.backbone, settings), r.defaults


class ScriptedAnswers:
    """A forward hook on the LLaVA model that replaces its logits so that greedy decoding
    spells ``answers[class name]`` then EOS; every forward still runs (prefix cache, image).
    The question forward is recognised by its ids ending in the class's question."""

    def __init__(self, seg, answers: dict[str, str]):
        from methods.fseg.qap import question_ids

        tok, tpl = seg.llava.tokenizer, seg.llava.template
        self.questions = {tuple(question_ids(tok, tpl, n)): n for n in answers}
        self.scripts = {n: tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                        for n, a in answers.items()}
        self.todo: list[int] = []
        self.calls = 0

    def __call__(self, module, args, kwargs, out):
        ids = kwargs["input_ids"][0].tolist()
        for q, name in self.questions.items():
            if tuple(ids[-len(q):]) == q:
                self.todo = list(self.scripts[name])
        if not self.todo or out.logits is None:
            return out
        self.calls += 1
        logits = torch.full_like(out.logits, -1e4)
        logits[..., self.todo.pop(0)] = 1e4
        out.logits = logits
        return out


def test_presence_comes_from_the_models_answers(seg_defaults):
    """present=None (presence_source: model): the yes-set is what the model answered, here
    dog only although the dense labels hold cat and potted plant; the answers are in the
    evidence and decode needs no LLaVA."""
    seg, defaults = seg_defaults
    image = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ground_truth = [1, 3]                                  # cat, potted plant
    answers = {"cat": "No.", "dog": "Yes, it contains a dog. The dog is the main object in this "
               "image.", "potted plant": "no, it contains a cat."}
    hook = ScriptedAnswers(seg, answers)
    handle = seg.llava.model.register_forward_hook(hook, with_kwargs=True)
    try:
        ev = seg.extract(image, CLASSES, None)
    finally:
        handle.remove()
    assert hook.calls >= len("yes it contains a dog".split())     # the greedy loop really ran
    assert ev.meta["qa"] == "model" and ev.meta["yes"] == [2] != ground_truth
    tok = seg.llava.tokenizer
    spoken = {str(CLASSES.names.index(n)): tok.decode(tok(a, add_special_tokens=False)
                                                      ["input_ids"]).strip()
              for n, a in answers.items()}
    assert ev.meta["answers"] == spoken and spoken["2"].endswith("image .")
    assert ev.meta["has_s1"] == [True] and ev.meta["s0_fallbacks"] == 0
    labelled = seg.extract(image, CLASSES, ground_truth)           # image_labels / ground truth
    assert labelled.meta["qa"] == "present" and labelled.meta["yes"] == ground_truth

    tensors, meta = ev.to_safetensors_dict()                       # as the cache stores it
    from safetensors.torch import load, save
    cached = Evidence.from_safetensors_dict(load(save(tensors, metadata=meta)), meta)
    model, seg.llava.model = seg.llava.model, None                 # decode without LLaVA
    try:
        got = seg.decode(cached, defaults)
    finally:
        seg.llava.model = model
    assert set(np.unique(got)) <= {0, 2} and (got == 2).any()


def test_presence_source_is_checked_and_keys_the_evidence(seg_defaults):
    from methods.fseg import SEGMENTER

    seg, _ = seg_defaults
    assert seg.settings_key()["presence_source"] == "model"
    r = resolve(SPEC, backbone="tiny", dataset="voc21")
    other = SEGMENTER(seg.llava, seg.sam, r.backbone,
                      {**r.settings, "presence_source": "ground_truth"})
    assert other.settings_key() != seg.settings_key()
    with pytest.raises(OvssError, match="presence_source"):
        SEGMENTER(seg.llava, seg.sam, r.backbone, {**r.settings, "presence_source": "labels"})


# --- transformers cache API -----------------------------------------------------------------------
def test_cached_question_pass_sees_the_image(seg_defaults):
    """The question's logits from the prefix cache equal a full forward over prefix + question
    with the image, and differ for another image (a swallowed cache keyword would make the
    cached pass image-blind: its logits would not move with the image)."""
    from methods.fseg.llava_pass import PrefixRunner, encode_image, pixel_inputs
    from methods.fseg.qap import prefix_ids, question_ids

    seg, _ = seg_defaults
    llava, tok, s = seg.llava, seg.llava.tokenizer, seg.settings
    q = question_ids(tok, llava.template, "cat")
    out = []
    for image in (RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8),
                  RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)):
        tokens = encode_image(llava, image, True, s["grid"], s["vgm_features"], "cpu")
        runner = PrefixRunner(llava, tokens, "cpu")
        cached = runner._forward(q).logits[0, -1]
        runner._rollback()
        inputs, _ = pixel_inputs(llava, image, True)
        ids = torch.tensor([prefix_ids(tok, llava.template, llava.image_token_id,
                                       tokens.n_tokens) + q])
        with torch.no_grad():
            full = llava.model(input_ids=ids, **inputs).logits[0, -1]
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
        out.append(cached)
    assert (out[0] - out[1]).abs().max() > 100 * 1e-5


def test_check_api_refuses_a_forward_without_cache():
    from methods.fseg.backbone import check_api

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, mm_encoder_outputs=None, **kw):
            return None

    with pytest.raises(OvssError, match=r"no \['cache'\].*transformers"):
        check_api(Old())


# --- sink heads -----------------------------------------------------------------------------------
def loop_chord(values: list[float]) -> float:
    """Elbow by the chord: the sorted point farthest (perpendicular) from the first-last line."""
    v = sorted(values)
    if len(v) <= 2:
        return v[0]
    x0, y0, x1, y1 = 0.0, v[0], float(len(v) - 1), v[-1]
    norm = math.hypot(x1 - x0, y1 - y0)
    dist = [abs((x1 - x0) * (y0 - y) - (x0 - i) * (y1 - y0)) / norm for i, y in enumerate(v)]
    return v[dist.index(max(dist))]


def test_chord_threshold_and_candidate_heads_against_loops():
    for seed in range(5):
        vals = torch.from_numpy(np.random.default_rng(seed).random(13) ** 4)
        assert math.isclose(fm.chord_threshold(vals), loop_chord(vals.tolist()), rel_tol=1e-12)
    assert fm.chord_threshold(torch.tensor([0.3, 0.1])) == pytest.approx(0.1)
    maps = torch.rand(12, 20) * torch.rand(12, 1) ** 3 / 20          # masses spread in 0..1
    layers = torch.arange(12) // 3
    keep = fm.candidate_heads(maps, layers, (4, 5), 1.0, "chord", 1)
    masses = [float(m.sum()) for m in maps]
    th = loop_chord(masses)
    assert keep.tolist() == [masses[i] >= th - 1e-9 and int(layers[i]) >= 1 for i in range(12)]
    assert 0 < int(keep.sum()) < 9


def sink_maps(grid=(6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """L=4 blocks x H=2 heads over a 6x6 grid: object heads cover a 2x2 object (+ a stray
    cell, so their entropy is > 0); a sink head puts almost all its mass off the image and its
    residue on one cell (entropy 0): it wins the top-1 by entropy without the guard; so does a
    one-cell head of block 0."""
    n = grid[0] * grid[1]
    obj = torch.full((n,), 0.01)
    obj[[7, 8, 13, 14]] = 0.15                                       # rows 1-2, cols 1-2
    obj[35] = 0.1                                                    # the far corner
    sink = torch.zeros(n)
    sink[5] = 0.004                                                  # image mass 0.004
    maps = obj.repeat(4, 2, 1).clone()
    maps[3, 1] = sink                                                # a sink head, block 3
    maps[0, 0] = torch.eye(n)[30] * 0.9                              # high mass, block 0
    return maps, fm.spatial_entropies(maps, grid)


@pytest.mark.parametrize("variant", fm.ENTROPY_VARIANTS)
def test_guard_keeps_sink_heads_out_of_m_a(seg_defaults, variant):
    from methods.fseg.pipeline import attention_mask

    _, defaults = seg_defaults
    maps, ent = sink_maps()
    v = fm.ENTROPY_VARIANTS.index(variant)
    assert float(ent[v, 3, 1]) == 0.0 < float(ent[v, 1, 0])         # the sink is the top-1
    obj_mask = fm.m_a(maps[1, 0])
    p = {**defaults, "K": 1, "entropy": variant, "attn_layers": "all"}
    assert defaults["image_mass"] == "chord" and defaults["skip_layers"] == 2
    guarded = attention_mask(maps, ent[v], [0, 1, 2, 3], p, (6, 6))
    assert torch.equal(guarded, obj_mask)
    no_mass = attention_mask(maps, ent[v], [0, 1, 2, 3], {**p, "image_mass": "none"}, (6, 6))
    assert torch.equal(no_mass, fm.m_a(maps[3, 1]))                  # the sink wins unguarded
    no_skip = attention_mask(maps, ent[v], [0, 1, 2, 3], {**p, "skip_layers": 0}, (6, 6))
    assert torch.equal(no_skip, fm.m_a(maps[0, 0]))                  # block 0's one-cell head
    assert not torch.equal(no_skip, obj_mask) and not torch.equal(no_mass, obj_mask)


# --- de-noising sizes -----------------------------------------------------------------------------
def test_default_denoising_drops_one_token_and_keeps_an_object():
    """VOC geometry (375 x 500, LLaVA-1.5 24 x 24 grid over the padded 500 x 500 square): a
    single-token blob beside a 4 x 3-token object is no prompt with the defaults, which the
    old pixel defaults (5 px kernel, 0.1 % of the image) kept as a point that stretched the box."""
    from methods.fseg.pipeline import Geometry, denoise_sizes
    from methods.fseg.prompts import sam_prompts, upsample_to_image

    r = resolve(SPEC, backbone="llava-1.5-7b", dataset="voc21")
    d = r.defaults
    geo = Geometry((375, 500), (24, 24), (-62, 0, 500, 500))
    kernel, min_area = denoise_sizes(geo, d)
    assert kernel == round(0.5 * 500 / 24) and math.isclose(min_area * 375 * 500,
                                                            2.0 * (500 / 24) ** 2)
    grid = torch.zeros(1, 24, 24)
    grid[0, 8:11, 4:8] = 1.0                                         # the object
    grid[0, 16, 18] = 1.0                                            # one token
    for mode in ("nearest", "bilinear"):
        mask = upsample_to_image(grid, geo.view, geo.image_size, mode)[0].numpy() > 0.5
        one = mask.copy()
        one[:, :300] = False
        assert 0.001 < one.mean() < 0.003                           # ~0.23 % of the image
        args = (d["morph"], min_area, d["max_points"], d["snap_centroid"], d["empty"])
        got = sam_prompts(mask, kernel, *args)
        assert len(got.points) == 1 and got.box[2] < 200 and got.box[3] < 200
        x0, y0 = 4 * 500 / 24, 8 * 500 / 24 - 62
        assert abs(got.box[0] - x0) < 12 and abs(got.box[1] - y0) < 12
        old = sam_prompts(mask, 5, d["morph"], 0.001, d["max_points"], False, "raw")
        assert len(old.points) == 2 and old.box[2] > 370             # the token stretched it
    for k in ("kernel_tokens", "min_area_tokens"):                  # the space reaches them
        sp = r.space[k]
        lo, hi = (min(sp.choices), max(sp.choices)) if sp.type == "categorical" else \
            (sp.low, sp.high)
        assert lo == 0 and lo < d[k] < hi


def test_what_decode_thresholds_is_stored_in_float32(seg_defaults):
    """evidence_dtype float16 rounds F_v only: the attention maps (binarised at their mean,
    summed for the head guard) and the SAM embedding stay float32 (bench/fseg.py --precision:
    float16 maps or embedding changed label maps, float16 F_v did not)."""
    from methods.fseg import SEGMENTER

    seg, _ = seg_defaults
    r = resolve(SPEC, backbone="tiny", dataset="voc21")
    half = SEGMENTER(seg.llava, seg.sam, r.backbone, {**r.settings, "evidence_dtype": "float16"})
    ev = half.extract(RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8), CLASSES, [1])
    assert ev.tensors["sam_embedding"].dtype == torch.float32 == ev.tensors["attn"].dtype
    assert ev.tensors["fv"].dtype == torch.float16
    full = SEGMENTER(seg.llava, seg.sam, r.backbone, {**r.settings, "evidence_dtype": "float32"})
    ev = full.extract(RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8), CLASSES, [1])
    assert ev.tensors["fv"].dtype == torch.float32
