"""The CLIP contrastive reward (rewards/clip_contrastive.py) on tiny open_clip models.

Two models: the YAML's ``tiny`` backbone with random weights (for transcription and batching
checks), and a "colour CLIP" whose weights are set by hand so that the image embedding is the
mean colour direction of the non-black pixels and each class text embedding is its colour's
direction (see ``colour_clip``): there a correct mask must win and a wrong one must lose.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg

from methods.base import ClassSet, OvssError
from rewards.clip_contrastive import (
    ClipContrastiveReward,
    blur_and_rebinarise,
    class_probability,
    load_clip,
    masked_image,
    reward_terms,
)

CONF = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "rewards" / "clip.yaml")
                      .read_text())
TINY = {"name": "tiny", **CONF["backbones"]["tiny"]}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# where each colour's square lies in the 96x96 test image (rows, cols), on a grey background
SQUARES = {"red": (slice(6, 42), slice(6, 42)), "green": (slice(6, 42), slice(54, 90)),
           "blue": (slice(54, 90), slice(30, 66))}
COLOUR_CLASSES = ClassSet.from_names(list(COLOURS), background=True)


# --- the formula against a loop transcription --------------------------------------------------
def loop_probabilities(masked, black, text, targets, cand_sets, temperature):
    """Eq. 5 written out with Python floats, one pair at a time: [(Pr(M(x)I, k), Pr(0, k))]."""
    def pr(feat, k, cands):
        sims = {c: sum(a * b for a, b in zip(feat, text[c])) / temperature for c in cands}
        top = max(sims.values())
        return math.exp(sims[k] - top) / sum(math.exp(s - top) for s in sims.values())

    return [(pr(masked[p], k, cands), pr(black, k, cands))
            for p, (k, cands) in enumerate(zip(targets, cand_sets))]


def loop_wins(masked, black, text, targets, cand_sets, temperature):
    """Eq. 4's indicator on top of ``loop_probabilities``."""
    return [pm > pb for pm, pb in
            loop_probabilities(masked, black, text, targets, cand_sets, temperature)]


@pytest.mark.parametrize("temperature", [0.01, 0.3])
def test_reward_terms_match_loop_transcription(temperature):
    g = torch.Generator().manual_seed(1)
    n_pairs, n_classes, dim = 200, 7, 16
    norm = torch.nn.functional.normalize
    masked = norm(torch.randn(n_pairs, dim, generator=g, dtype=torch.float64), dim=-1)
    black = norm(torch.randn(dim, generator=g, dtype=torch.float64), dim=0)
    text = norm(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=-1)
    cand = torch.rand(n_pairs, n_classes, generator=g) < 0.5
    targets = torch.randint(0, n_classes, (n_pairs,), generator=g)
    cand[torch.arange(n_pairs), targets] = True         # k is always one of its candidates
    cand[torch.arange(n_pairs), (targets + 1) % n_classes] = True   # and never alone
    got = reward_terms(masked, black, text, targets, cand, temperature).tolist()
    sets = [row.nonzero()[:, 0].tolist() for row in cand]
    want = loop_wins(masked.tolist(), black.tolist(), text.tolist(), targets.tolist(), sets,
                     temperature)
    assert got == want
    assert 0 < sum(got) < n_pairs                        # both outcomes are exercised
    probs = class_probability(masked, text, temperature, cand)
    assert torch.allclose(probs.sum(-1), torch.ones(n_pairs, dtype=torch.float64))
    assert (probs[~cand] == 0).all()


def test_score_batch_matches_transcription_with_the_tiny_clip():
    """Batched scoring (one CLIP call, memoised black term) == per-pair CLIP calls + loop.

    Random tiny-CLIP embeddings are all alike, so at T = 0.01 Pr saturates at 0 or 1 and the
    comparison with the black image would turn on float noise; T = 0.3 keeps every pair clear."""
    classes = ClassSet.from_names(["cat", "dog", "car", "bus"], background=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(4)]
    preds = [rng.integers(0, 5, im.shape[:2]) for im in images]
    preds[1][:] = 2                                      # classes 1 and 3 predicted nowhere
    presents = [[0, 1, 2], [1, 2, 3], [4, 2, 0, 3], [3]]
    for rule in ("image", "dataset"):
        reward = ClipContrastiveReward.from_spec(TINY, {**CONF["settings"], "candidates": rule,
                                                        "temperature": 0.3}, classes)
        got = reward.score_batch(images, preds, presents)
        text = reward.text_features().tolist()
        black = reward.black_features().tolist()
        want = []
        for image, pred, present in zip(images, preds, presents):
            labels = sorted(set(present) - {0})
            cands = labels if rule == "image" else [1, 2, 3, 4]
            if len(cands) < 2:
                want.append((0, 0))
                continue
            wins = 0
            for k in labels:
                mask = torch.from_numpy(pred == k)[None, None].float()
                mask = torch.nn.functional.interpolate(mask, size=(32, 32), mode="bilinear",
                                                       antialias=True)[0, 0] > 0.5
                if mask.any():
                    feat = reward.encode(masked_image(reward.clip_input(image), mask)[None])
                    (pm, pb), = loop_probabilities(feat.tolist(), black, text, [k], [cands], 0.3)
                    assert abs(pm - pb) > 1e-5            # a clear decision, not a near-tie
                    wins += pm > pb
            want.append((wins, len(labels)))
        assert got == want, rule
        assert want[-1] == ((0, 0) if rule == "image" else (want[-1][0], 1))
    assert 0 < sum(w for w, _ in want) < sum(n for _, n in want)


# --- a CLIP whose embeddings are colours ---------------------------------------------------------
def colour_direction(rgb) -> torch.Tensor:
    """[8]: (r, g, b, -r, -g, -b, 0, 0), zero-mean so LayerNorm only rescales it."""
    c = torch.tensor(rgb, dtype=torch.float32) / 255
    return torch.cat([c, -c, torch.zeros(2)])


def colour_clip(settings=None) -> ClipContrastiveReward:
    """The real open_clip CLIP class (width 8, one block per tower) with weights set by hand.

    Image tower: pixels are not normalised (mean 0, std 1), the patch embedding maps a patch to
    (sum of its pixels) @ [I, -I, 0], class and position embeddings are 0, the blocks' residual
    branches are 0 (identity blocks), LayerNorms only rescale the zero-mean patch vectors (a
    black patch stays 0), patch tokens are averaged and projected by I. So the embedding points
    along the colour of the non-black pixels, and the black image embeds to 0 (uniform Pr).
    Text tower: the token embedding of "red"/"green"/"blue" is that colour's direction, every
    other token (start, end) is 0; attention has zero queries/keys (uniform over the causal
    prefix) and identity values/output, so the end token, which open_clip pools, receives the
    mean of the prefix: the colour word's direction.
    """
    backbone = {"name": "colour", "tiny": {
        "embed_dim": 8, "image_size": 32, "patch_size": 8, "width": 8, "layers": 1, "heads": 2,
        "text_width": 8, "text_layers": 1, "text_heads": 2, "context_length": 8,
        "vision": {"pool_type": "avg"}}}
    model, tokenizer, _ = load_clip(backbone)
    eye = torch.eye(8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.reset_parameters()
        v = model.visual
        v.conv1.weight.zero_()
        for j in range(3):
            v.conv1.weight[j, j] = 1.0
            v.conv1.weight[j + 3, j] = -1.0
        for p in (v.class_embedding, v.positional_embedding, model.positional_embedding,
                  model.token_embedding.weight):
            p.zero_()
        for blk in [*v.transformer.resblocks, *model.transformer.resblocks]:
            blk.mlp.c_proj.weight.zero_()
            blk.mlp.c_proj.bias.zero_()
            blk.attn.in_proj_weight.zero_()
            blk.attn.in_proj_weight[16:] = eye          # values = identity, queries/keys = 0
            blk.attn.in_proj_bias.zero_()
            blk.attn.out_proj.weight.copy_(eye)
            blk.attn.out_proj.bias.zero_()
        for blk in v.transformer.resblocks:
            blk.attn.out_proj.weight.zero_()           # image blocks: identity
        v.proj.copy_(eye)
        model.text_projection.copy_(eye)
        for name, rgb in COLOURS.items():
            model.token_embedding.weight[int(tokenizer([name])[0, 1])] = colour_direction(rgb)
    set_model_preprocess_cfg(model, {**get_model_preprocess_cfg(model),
                                     "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    return ClipContrastiveReward(model, tokenizer, COLOUR_CLASSES,
                                 {**CONF["settings"], **(settings or {})})


def colour_scene() -> tuple[np.ndarray, np.ndarray]:
    """96x96 grey image with a red, a green and a blue square; its true label map."""
    image = np.full((96, 96, 3), 128, np.uint8)
    truth = np.zeros((96, 96), np.int64)
    for name, (rows, cols) in SQUARES.items():
        image[rows, cols] = COLOURS[name]
        truth[rows, cols] = COLOUR_CLASSES.names.index(name)
    return image, truth


def test_colour_clip_embeds_colours():
    reward = colour_clip()
    text = reward.text_features()
    for name, rgb in COLOURS.items():
        k = COLOUR_CLASSES.names.index(name)
        plain = reward.encode(reward.clip_input(np.full((20, 20, 3), rgb, np.uint8))[None])[0]
        assert torch.dot(plain, text[k]) > 0.999
        assert torch.dot(plain, text[k % 3 + 1]) < 0.01    # another colour's text
    assert torch.count_nonzero(reward.black_features()) == 0


def test_perfect_mask_beats_empty_and_wrong_masks():
    reward = colour_clip()
    image, truth = colour_scene()
    present = [1, 2, 3]
    swapped = truth.copy()                                # red <-> blue regions exchanged
    swapped[truth == 1], swapped[truth == 3] = 3, 1
    empty = np.zeros_like(truth)
    perfect, wrong, none = reward.score_batch([image] * 3, [truth, swapped, empty], [present] * 3)
    assert perfect == (3, 3)                              # every class beats the black image
    assert none == (0, 3)                                 # an empty mask *is* the black image
    assert wrong == (1, 3)                                # only green kept its own square
    assert perfect[0] >= none[0] and perfect[0] > wrong[0]


def test_single_class_images_depend_on_the_candidate_rule():
    image, truth = colour_scene()
    only_red = np.where(truth == 1, 1, 0)
    own = colour_clip({"candidates": "image"}).score_batch([image], [only_red], [[1]])
    every = colour_clip({"candidates": "dataset"}).score_batch([image], [only_red], [[1]])
    assert own == [(0, 0)]                                # softmax over {red}: 1 = 1, unscored
    assert every == [(1, 1)]


# --- the accumulator -----------------------------------------------------------------------------
class _DenseLabel:
    """A stand-in for a dense label map that fails the test on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the clip reward read the dense label ({name})")

    def __array__(self, *a, **k):
        raise AssertionError("the clip reward converted the dense label to an array")

    def __getitem__(self, key):
        raise AssertionError("the clip reward indexed the dense label")

    def __eq__(self, other):
        raise AssertionError("the clip reward compared the dense label")

    __hash__ = object.__hash__


def scenes(n: int, seed: int = 0):
    """n colour scenes, each labelled with 2-3 colours (sometimes also background), predicted
    perfectly, with two labelled squares swapped (both lose) or with one square missed (loses).
    Wrong masks only ever show another candidate's colour, so no pair is a near-tie."""
    rng = np.random.default_rng(seed)
    image, truth = colour_scene()
    out = []
    for _ in range(n):
        present = sorted(rng.choice([1, 2, 3], rng.integers(2, 4), replace=False).tolist())
        a, b = rng.choice(present, 2, replace=False)
        pred, mode = truth.copy(), rng.integers(0, 3)
        if mode == 1:
            pred[truth == a], pred[truth == b] = b, a
        elif mode == 2:
            pred[truth == a] = 0
        out.append((image, pred, [0] * int(rng.integers(0, 2)) + present))
    return out


def test_accumulator_never_reads_the_dense_label():
    reward = colour_clip({"batch_size": 3})
    data = scenes(5)
    a, b = reward.new(), reward.new()
    for image, pred, present in data:
        a.update(image, pred, label=_DenseLabel(), present=present)
        b.update(image, pred, present=present)
    assert a.value() == b.value() and a.details() == b.details()
    with pytest.raises(OvssError, match="image-level labels"):
        reward.new().update(data[0][0], data[0][1], present=None)


def test_batching_equals_one_at_a_time():
    data = scenes(7, seed=3)
    one = colour_clip({"batch_size": 1})
    many = colour_clip({"batch_size": 3, "clip_batch_size": 2})
    singles = [one.score_batch([im], [p], [q])[0] for im, p, q in data]
    assert many.score_batch(*zip(*data)) == singles
    acc_one, acc_many = one.new(), many.new()
    for image, pred, present in data:
        acc_one.update(image, pred, present=present)
        acc_many.update(image, pred, present=present)
    assert acc_many.value() == acc_one.value()
    assert acc_many.per_image == acc_one.per_image == singles
    wins, pairs = sum(w for w, _ in singles), sum(n for _, n in singles)
    assert 0 < wins < pairs and acc_one.value() == wins / pairs


def test_text_and_black_image_are_computed_once():
    reward = colour_clip()
    calls = []
    encode_text = reward.model.encode_text
    reward.model.encode_text = lambda t: calls.append(len(t)) or encode_text(t)
    image, truth = colour_scene()
    for _ in range(3):
        reward.score_batch([image, image], [truth, truth], [[1, 2], [1, 2, 3]])
    assert calls == [3]                                   # one text call, 3 classes x 1 template
    assert reward.clip_images == 3 * 5 + 1                # masked images, plus black once


def test_blur_and_rebinarise_matches_scipy():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), np.float32)
    mask[8:30, 5:25] = 1
    mask[rng.random((40, 40)) < 0.03] = 1                 # speckles that the blur removes
    sigma, thr = 2.0, 0.3
    ref = gaussian_filter(mask.astype(np.float64), sigma, mode="mirror", truncate=3.0)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    got = blur_and_rebinarise(torch.from_numpy(mask)[None], sigma, thr)[0].numpy()
    clear = np.abs(ref - thr) > 1e-4
    assert (got[clear] == (ref[clear] > thr)).all()
    assert got.sum() < mask.sum() + 40 and not got[0:4, 30:40].any()
    full = blur_and_rebinarise(torch.ones(1, 16, 16), sigma, thr)
    assert full.all()                                     # constant mask: no 0/0


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, settings, match", [
    ({"name": "x", "model": "ViT-B-16", "path": "/nonexistent/ckpt.pt"}, {}, "not found"),
    ({"name": "x", "model": "ViT-Nope", "pretrained": "openai"}, {}, "unknown open_clip model"),
    ({"name": "x", "model": "ViT-B-16"}, {}, "give 'pretrained'"),
    (TINY, {"candidates": "all"}, "settings.candidates"),
    (TINY, {"temprature": 0.1}, "unknown setting 'temprature'"),
    (TINY, {"templates": "a photo of {}"}, "settings.templates"),
])
def test_loading_and_setting_errors_name_the_thing(backbone, settings, match):
    with pytest.raises(OvssError, match=match):
        ClipContrastiveReward.from_spec(backbone, settings, COLOUR_CLASSES)


def test_bad_inputs_raise_ovss_errors():
    reward = colour_clip()
    image, truth = colour_scene()
    with pytest.raises(OvssError, match="label map of size"):
        reward.score_batch([image], [truth[:50]], [[1]])
    with pytest.raises(OvssError, match="outside 0..3"):
        reward.score_batch([image], [truth], [[1, 9]])
