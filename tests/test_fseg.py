"""FSeg-LLaVA: every formula against a plain-loop transcription, the prompts, QAP bookkeeping.
(The model path on tiny LLaVA + tiny SAM, loading errors: tests/test_fseg_model.py.)"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from methods.base import OvssError
from methods.fseg import formulas as fm
from methods.fseg.backbone import tiny_tokenizer
from methods.fseg.prompts import components, denoise, merge_masks, upsample_to_image
from methods.fseg.qap import answer_tokens, is_yes, locate
from methods.spec import load_method_spec
from search.core.config import resolve

SPEC = load_method_spec("fseg")
RNG = np.random.default_rng(0)


# --- plain-loop transcriptions --------------------------------------------------------------------
def loop_components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first search, in raster order of their first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                comp, todo = [], deque([(y, x)])
                seen[y, x] = True
                while todo:
                    cy, cx = todo.popleft()
                    comp.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                todo.append((ny, nx))
                comps.append(comp)
    return comps


def loop_entropy(a: np.ndarray, variant: str) -> float:
    mean = sum(a.ravel()) / a.size
    k = 1.0 if variant == "area_mean" else 2.0
    b = np.array([[max(v - k * mean, 0.0) for v in row] for row in a])
    cut = 0.0 if variant == "area_mean" else 1e-3 * b.max()
    comps = loop_components(b > cut) if b.max() > 0 else []
    if not comps:
        return math.inf
    sizes = [len(c) if variant == "area_mean" else sum(b[p] for p in c) for c in comps]
    total = sum(sizes)
    return -sum(s / total * math.log(s / total) for s in sizes)


def loop_morph(mask: np.ndarray, k: int, erode: bool) -> np.ndarray:
    h, w = mask.shape
    r = k // 2
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            vals = [mask[y + dy, x + dx] for dy in range(-r, k - r) for dx in range(-r, k - r)
                    if 0 <= y + dy < h and 0 <= x + dx < w]
            out[y, x] = all(vals) if erode else any(vals)
    return out


def cosine(a, b) -> float:
    return float(sum(x * y for x, y in zip(a, b))
                 / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b)))


# --- formulas -------------------------------------------------------------------------------------
def test_d_tilde_tau_d_against_loops():
    cos = torch.rand(5, 3, 12) * 2 - 1                 # layers x maps x N
    dt = fm.d_tilde(cos)
    alpha, beta = 0.7, 0.35
    th = fm.tau(dt, alpha, beta)
    d = fm.d_thresholded(dt, th)
    for m in range(3):
        ref = [sum(float(cos[layer, m, i]) for layer in range(5)) / 5 for i in range(12)]
        assert np.allclose(dt[m].numpy(), ref, atol=1e-6)
        t = min(alpha * max(ref), beta)
        assert math.isclose(float(th[m]), t, rel_tol=1e-6)
        assert np.allclose(d[m].numpy(), [v if v >= t else 0.0 for v in ref], atol=1e-6)
    assert (th <= beta + 1e-7).all() and (d == 0).any() and (d != 0).any()


def test_pool_subtokens():
    maps = torch.rand(3, 7)
    assert torch.allclose(fm.pool_subtokens(maps, "mean"), (maps[0] + maps[1] + maps[2]) / 3)
    assert torch.equal(fm.pool_subtokens(maps, "last"), maps[2])
    assert torch.equal(fm.pool_subtokens(maps, "first"), maps[0])


@pytest.mark.parametrize("variant", fm.ENTROPY_VARIANTS)
def test_spatial_entropy_against_loops(variant):
    for seed in range(6):
        a = np.random.default_rng(seed).random((6, 7)) ** 3
        got, ref = fm.spatial_entropy(a, variant), loop_entropy(a, variant)
        assert math.isclose(got, ref, rel_tol=1e-9, abs_tol=1e-12)
    blob = np.zeros((6, 6))
    blob[1:3, 1:3] = 1.0
    assert fm.spatial_entropy(blob, variant) == 0.0             # one compact component
    assert fm.spatial_entropy(np.ones((4, 4)), variant) == math.inf   # nothing above the mean
    maps = torch.rand(2, 3, 42)
    table = fm.spatial_entropies(maps, (6, 7))
    v = fm.ENTROPY_VARIANTS.index(variant)
    assert math.isclose(float(table[v, 1, 2]), loop_entropy(maps[1, 2].reshape(6, 7).double()
                                                            .numpy(), variant), rel_tol=1e-5)


def test_top_k_a_v_m_a_d_f_against_loops():
    maps, entropy = torch.rand(9, 20), torch.rand(9)
    keep = torch.tensor([True, False] * 4 + [True])
    for k in (1, 3, 50):
        av = fm.a_v(maps, entropy, k, keep)
        cand = sorted([i for i in range(9) if keep[i]], key=lambda i: float(entropy[i]))[:k]
        ref = [sum(float(maps[i, n]) for i in cand) / len(cand) for n in range(20)]
        assert np.allclose(av.numpy(), ref, atol=1e-6)
    assert fm.a_v(maps, entropy, 3, torch.zeros(9, dtype=torch.bool)) is None
    av = fm.a_v(maps, entropy, 3)
    mean = sum(float(v) for v in av) / 20
    ma = fm.m_a(av)
    assert ma.tolist() == [1.0 if float(v) > mean else 0.0 for v in av]
    d = torch.rand(20)
    assert fm.d_f(d, ma).tolist() == [float(d[i]) * ma[i].item() for i in range(20)]
    grid = torch.zeros(2, 4, 5)
    grid[0, -1] = 0.2                                           # a "sink" in the last grid row
    grid[1, 0] = 0.2
    assert fm.sink_free(grid.reshape(2, 20), (4, 5), 0.5).tolist() == [False, True]


def test_background_guidance_prototypes_m_v_m_r_against_loops():
    y, n, dv = 3, 16, 5
    df = torch.rand(y, n) * (torch.rand(y, n) > 0.4)
    alpha, beta = 0.5, 0.3
    bg = fm.d_f_bg(df, alpha, beta)
    assert math.isclose(float(bg), min(alpha * float(df.max()), beta), rel_tol=1e-6)
    guide = fm.guidance_map(df, bg)
    for i in range(n):
        vals = [float(bg)] + [float(df[c, i]) for c in range(y)]
        assert int(guide[i]) == vals.index(max(vals))
    fv = torch.randn(n, dv)
    for label in range(1, y + 1):
        pos, neg = fm.prototypes(fv, guide, label)
        inside = [i for i in range(n) if int(guide[i]) == label]
        outside = [i for i in range(n) if int(guide[i]) != label]
        if not inside:
            assert pos is None
            continue
        ref_pos = [sum(float(fv[i, d]) for i in inside) / len(inside) for d in range(dv)]
        ref_neg = [sum(float(fv[i, d]) for i in outside) / len(outside) for d in range(dv)]
        assert np.allclose(pos.numpy(), ref_pos, atol=1e-6)
        assert np.allclose(neg.numpy(), ref_neg, atol=1e-6)
        mv = fm.m_v(fv, pos, neg)
        ref_mv = [cosine(fv[i].tolist(), ref_pos) > cosine(fv[i].tolist(), ref_neg)
                  for i in range(n)]
        assert mv.tolist() == ref_mv
        assert fm.m_r(mv, guide, label).tolist() == [ref_mv[i] and int(guide[i]) == label
                                                     for i in range(n)]
    assert fm.m_v(fv, fv[0], None).all()


# --- prompts --------------------------------------------------------------------------------------
def test_denoise_and_prompt_extraction_against_loops():
    mask = RNG.random((30, 40)) > 0.55
    for k in (3, 5):
        opened = loop_morph(loop_morph(mask, k, True), k, False)
        ref = loop_morph(loop_morph(opened, k, False), k, True)
        assert np.array_equal(denoise(mask, k, "open_close"), ref)
    assert np.array_equal(denoise(mask, 0), mask)
    min_area, max_points = 0.004, 3
    got = components(mask, min_area, max_points)
    comps = [c for c in loop_components(mask) if len(c) >= min_area * mask.size]
    comps = sorted(comps, key=lambda c: -len(c))[:max_points]
    ref_pts = sorted((sum(x for _, x in c) / len(c), sum(y for y, _ in c) / len(c)) for c in comps)
    assert np.allclose(sorted(map(tuple, got.points)), ref_pts)
    pix = [p for c in comps for p in c]
    assert got.box.tolist() == [min(x for _, x in pix), min(y for y, _ in pix),
                                max(x for _, x in pix), max(y for y, _ in pix)]
    assert components(np.zeros((5, 5), bool), 0.0, 3) is None
    ring = np.zeros((9, 9), bool)
    ring[1, 1:8] = ring[7, 1:8] = ring[1:8, 1] = ring[1:8, 7] = True
    snapped = components(ring, 0.0, 1, snap=True).points[0]
    assert ring[int(snapped[1]), int(snapped[0])]              # moved onto the ring
    assert not ring[4, 4] and np.allclose(components(ring, 0.0, 1).points[0], (4, 4))


def test_merge_masks_and_view_geometry():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:3, :3], b[1:, 1:] = True, True
    fill = np.full((4, 4), 9)
    out = merge_masks([a, b], [0.2, 0.5], [1, 2], fill)
    for y in range(4):
        for x in range(4):
            ref = 2 if b[y, x] else (1 if a[y, x] else 9)
            assert out[y, x] == ref
    assert merge_masks([a, b], [0.5, 0.5], [1, 2], fill)[2, 2] == 1    # tie: earlier wins
    grid = torch.arange(16.0).reshape(1, 4, 4)
    pad = upsample_to_image(grid, (-2, 0, 8, 8), (4, 8), "nearest")    # 4x8 image, padded
    assert pad.shape == (1, 4, 8)
    assert torch.equal(pad[0, :, ::2], grid[0, 1:3].repeat_interleave(2, 0))
    crop = upsample_to_image(torch.ones(1, 2, 2), (1, 2, 4, 4), (6, 8), "bilinear")
    assert crop[0, 1:5, 2:6].eq(1).all() and crop.sum() == 16


# --- QAP ------------------------------------------------------------------------------------------
def test_qap_answer_tokens():
    tok = tiny_tokenizer()
    ans = locate(tok, "yes, it contains a potted plant. The potted plant is green.", "potted plant")
    words = tok.convert_ids_to_tokens(ans.ids)
    assert [words[i] for i in ans.class_tokens] == ["potted", "plant"]
    assert [words[i] for i in ans.s1_tokens][:3] == ["the", "potted", "plant"]
    assert all(i > max(ans.class_tokens) + 1 for i in ans.s1_tokens)
    assert locate(tok, "Yes, there are two dogs. They run.", "cat") is None
    fb = answer_tokens(tok, "Yes, there are two dogs. They run.", "cat")
    assert fb.fallback and fb.text == "yes, it contains a cat. They run."
    assert [tok.convert_ids_to_tokens(fb.ids)[i] for i in fb.class_tokens] == ["cat"]
    assert is_yes(" Yes, it does.") and not is_yes("No.") and not is_yes("")


def test_yaml_layer_ranges_fit_every_backbone():
    blocks = {"llava-1.5-7b": 32, "llava-1.6-vicuna-7b": 32, "llava-1.6-mistral-7b": 32,
              "llava-1.5-13b": 40, "tiny": 4, "tiny-next": 4}
    from methods.fseg.pipeline import check_params
    assert set(blocks) == set(SPEC.backbones)
    for name, layers in blocks.items():
        r = resolve(SPEC, backbone=name, dataset="voc21")
        check_params(r.defaults, layers)
        worst = {**r.defaults, "l_s": r.space["l_s"].high, "l_span": r.space["l_span"].high}
        check_params(worst, layers)                               # the whole space is valid
    with pytest.raises(OvssError, match="l_s=3..l_e=5"):
        check_params({**resolve(SPEC, backbone="tiny").defaults, "l_s": 3}, 4)
