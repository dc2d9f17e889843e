"""`clipseg` (CLIP CRA + DSI): each formula against a slow transcription, decode(extract(x))
against a straight full forward on a tiny real open_clip model, geometry, errors, the YAML."""

from __future__ import annotations

import itertools
import time
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import ClassSet, Evidence, OvssError
from methods.clipseg import SEGMENTER
from methods.clipseg.formulas import (
    coherence_residual_attention,
    connected_components,
    deep_layer_output,
    deep_value,
    dense_output,
    integrated_value,
    key_gram,
    original_attention,
    relation_attention,
)
from methods.clipseg.reference import full_forward_labels, full_forward_probs
from methods.clipseg.variants import DEFAULT_VARIANTS
from methods.clipseg.vit import finish_block, split_qkv
from methods.clipseg.windows import mosaic, separable_upsampling, window_grid

TINY = {"name": "tiny", "tiny": {"width": 64, "layers": 5, "heads": 2, "patch_size": 8,
                                 "image_size": 32}}
GEOM = {"short_side": 48, "window": 32, "stride": 16, "templates": "simple"}
CLASSES = ClassSet(("background", "cat", "dog", "person"),
                   (("background",), ("cat",), ("dog", "puppy"), ("person", "man", "woman")),
                   background=True)


#: The knobs of scclip (tiny: 5 blocks) and PAMR (off).
OFF = {"pre_adjust_idx": 2, "post_adjust_idx": 1, "multi_start_idx": 0, "multi_end_idx": 3,
       "res_cls": 0.3, "adjust_beta": 0.4, "mid_gamma": 3.0, "pamr_steps": 0,
       "pamr_dilations": "8,16"}


def params(**kw):
    base = {"layer": 2, "tau": 6.0, "epsilon": 0.75, "dsi_start": -3, "attention": "cra",
                "bg_threshold": 0.3, "min_pts": 3, "gaussian_std": 5.0, **OFF}
    return {**base, **kw}


@pytest.fixture(scope="module")
def seg32():
    return SEGMENTER.from_spec(TINY, {**GEOM, "evidence_dtype": "float32"})


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
    img = F.interpolate(torch.from_numpy(base).permute(2, 0, 1)[None], size=(40, 57),
                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return (img.numpy() + rng.normal(0, 20, img.shape)).clip(0, 255).astype(np.uint8)


# --- formulas against slow transcriptions --------------------------------------------------
def test_eq3_cra_logits_match_loops():
    torch.manual_seed(0)
    k = torch.randn(2, 7, 12)
    g = (torch.rand(2, 7, 7) > 0.5).float() * 0.75
    got = coherence_residual_attention(key_gram(k), 6.0, g)
    for b, i, j in itertools.product(range(2), range(7), range(7)):
        ki, kj = k[b, i].tolist(), k[b, j].tolist()
        dot = sum(x * y for x, y in zip(ki, kj))
        cos = dot / (sum(x * x for x in ki) ** 0.5 * sum(y * y for y in kj) ** 0.5)
        assert got[b, i, j].item() == pytest.approx((cos + g[b, i, j].item()) * 6.0, abs=1e-5)
    assert torch.allclose(coherence_residual_attention(key_gram(k), 5.0),
                          key_gram(k) * 5.0)


def python_dbscan_relation(gram: list[list[float]], eps: float, min_pts: int) -> list[list[float]]:
    """DBSCAN by hand: BFS over core points, border points join every neighbouring cluster."""
    n = len(gram)
    nbrs = [[j for j in range(n) if 1.0 - gram[i][j] <= eps] for i in range(n)]
    core = [len(nbrs[i]) >= min_pts for i in range(n)]
    cid = [-1] * n
    next_id = 0
    for s in range(n):
        if not core[s] or cid[s] >= 0:
            continue
        cid[s] = next_id
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v in nbrs[u]:
                if core[v] and cid[v] < 0:
                    cid[v] = next_id
                    queue.append(v)
        next_id += 1
    member = [{cid[o] for o in nbrs[i] if core[o]} for i in range(n)]
    return [[eps if member[i] & member[j] else 0.0 for j in range(n)] for i in range(n)]


@pytest.mark.parametrize("eps,min_pts,noise", [(0.15, 1, 1.0), (0.15, 3, 1.0), (0.4, 4, 0.7),
                                               (0.75, 5, 0.2), (0.75, 1, 0.25), (0.05, 2, 1.0)])
def test_relation_attention_matches_python_dbscan(eps, min_pts, noise):
    gen = torch.Generator().manual_seed(min_pts)
    centres = 3.0 * torch.eye(6)[:4]                         # 4 orthogonal clusters ...
    keys = centres[torch.randint(0, 4, (3, 30), generator=gen)]
    keys = keys + noise * torch.randn(3, 30, 6, generator=gen)   # ... and stragglers
    gram = key_gram(keys)
    got = relation_attention(gram, eps, min_pts)
    for b in range(3):
        want = torch.tensor(python_dbscan_relation(gram[b].tolist(), eps, min_pts))
        assert torch.equal(got[b], want)
    assert 0 < (got > 0).float().mean() < 1            # neither empty nor complete


def test_connected_components_match_bfs():
    gen = torch.Generator().manual_seed(3)
    adj = torch.rand(2, 40, 40, generator=gen) < 0.025
    adj = adj | adj.transpose(1, 2)
    labels = connected_components(adj)
    for b in range(2):
        for s in range(40):
            seen, queue = {s}, deque([s])
            while queue:
                u = queue.popleft()
                for v in torch.nonzero(adj[b, u]).flatten().tolist():
                    if v not in seen:
                        seen.add(v)
                        queue.append(v)
            assert set(torch.nonzero(labels[b] == labels[b, s]).flatten().tolist()) == seen
            assert labels[b, s].item() == min(seen)
    assert 2 < len(set(labels[0].tolist())) < 40              # several non-trivial components


def test_eq2_dense_output_matches_loops():
    torch.manual_seed(1)
    attn, v = torch.randn(2, 5, 6), torch.randn(2, 6, 8)
    proj = torch.nn.Linear(8, 8)
    got = dense_output(attn, v, out_proj=proj)
    for b, n in itertools.product(range(2), range(5)):
        w = [float(np.exp(a)) for a in attn[b, n].tolist()]
        w = [x / sum(w) for x in w]
        mixed = sum(w[t] * v[b, t] for t in range(6))
        want = proj.weight @ mixed + proj.bias
        assert torch.allclose(got[b, n], want, atol=1e-5)
    # the pre-multiplied form decode uses: Proj(A V) = A (V W^T) + b
    pre = dense_output(attn, v @ proj.weight.T, out_bias=proj.bias)
    assert torch.allclose(pre, got, atol=1e-5)


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = sum(x.tolist()) / len(x)
    var = sum((t - mu) ** 2 for t in x.tolist()) / len(x)
    return (x - mu) / (var + ln.eps) ** 0.5 * ln.weight + ln.bias


def test_eq4_deep_value_matches_per_token_transcription(seg32):
    blocks = seg32.visual.transformer.resblocks
    block, final = blocks[2], blocks[-1]
    torch.manual_seed(2)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        got = deep_value(deep_layer_output(x, block), final)
        dim = 64
        for t in range(5):
            h = _layer_norm(x[0, t], block.ln_2)
            h = block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(h)))
            x_tilde = x[0, t] + h                                   # x~ = x + FFN(x)
            z = _layer_norm(x_tilde, final.ln_1)
            want = final.attn.in_proj_weight[2 * dim:] @ z + final.attn.in_proj_bias[2 * dim:]
            assert torch.allclose(got[0, t], want, atol=1e-5)


def test_dsi_integrated_value_is_mean_of_first_terms():
    terms = torch.randn(4, 2, 3, 5)
    for start in (-1, -2, -3, -4):
        want = sum(terms[j] for j in range(-start)) / -start
        assert torch.allclose(integrated_value(terms, start), want, atol=1e-6)
    with pytest.raises(ValueError):
        integrated_value(terms, -5)


def test_qk_attention_is_the_modules_own_head_average(seg32):
    block = seg32.visual.transformer.resblocks[-1]
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        q, k, _ = split_qkv(block, x)
        z = block.ln_1(x)
        _, want = block.attn(z, z, z, need_weights=True, average_attn_weights=True)
        assert torch.allclose(original_attention(q, k, block.attn.num_heads), want, atol=1e-6)


def test_extraction_walk_equals_open_clip_block(seg32):
    block = seg32.visual.transformer.resblocks[1]
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        assert torch.allclose(finish_block(block, x, *split_qkv(block, x)), block(x), atol=1e-5)


# --- geometry ------------------------------------------------------------------------------
@pytest.mark.parametrize("size,out", [((48, 68), (40, 57)), ((20, 27), (33, 44))])
def test_separable_upsampling_equals_interpolate_and_average(size, out):
    grid = window_grid(size, 32, 16, 8)
    torch.manual_seed(4)
    win = torch.randn(grid.count, grid.gh * grid.gw, 3)
    canvas, count = torch.zeros(3, *size), torch.zeros(1, *size)
    ups = F.interpolate(win.transpose(1, 2).reshape(-1, 3, grid.gh, grid.gw),
                        size=(grid.ph, grid.pw), mode="bilinear", align_corners=False)
    for (y, x), u in zip([(y, x) for y in grid.ys for x in grid.xs], ups):
        canvas[:, y:y + grid.wh, x:x + grid.ww] += u[:, :grid.wh, :grid.ww]
        count[:, y:y + grid.wh, x:x + grid.ww] += 1
    want = F.interpolate((canvas / count)[None], size=out, mode="bilinear",
                         align_corners=False)[0]
    rows, cols = separable_upsampling(grid, out)
    got = rows @ mosaic(win, len(grid.ys), len(grid.xs), grid.gh, grid.gw) @ cols.T
    assert torch.allclose(got, want, atol=1e-5)


def test_window_grid_follows_slide_inference():
    g = window_grid((48, 68), 32, 16, 8)
    assert g.ys == (0, 16) and g.xs == (0, 16, 32, 36)
    small = window_grid((20, 27), 32, 16, 8)
    assert (small.ys, small.xs, small.ph, small.pw, small.gh) == ((0,), (0,), 24, 32, 3)


# --- extract once, decode many -------------------------------------------------------------
@pytest.mark.parametrize("attention", ["qk", "kk_last", "kk_mid", "cra"])
def test_decode_of_extract_equals_full_forward(seg32, image, attention):
    ev = seg32.extract(image, CLASSES)
    for dsi_start, layer in [(-1, 1), (-3, 2), (-4, 4)]:
        p = params(attention=attention, dsi_start=dsi_start, layer=layer, min_pts=2)
        got = seg32.decode_probs(ev, p)
        want = full_forward_probs(seg32, image, CLASSES, p)
        assert got.shape == (3, *image.shape[:2])
        assert (got - want).abs().max().item() < 1e-4
    assert np.array_equal(seg32.decode(ev, p), full_forward_labels(seg32, image, CLASSES, p))


def test_knobs_change_the_output(seg32, image):
    ev = seg32.extract(image, CLASSES)
    outs = [seg32.decode_probs(ev, params(**kw)) for kw in
            [{}, {"tau": 8.0}, {"layer": 3}, {"dsi_start": -1}, {"attention": "qk"},
             {"epsilon": 0.1, "min_pts": 1}]]
    for a, b in itertools.combinations(outs, 2):
        assert (a - b).abs().max() > 1e-4


def test_padded_small_image_with_pos_interpolation(image):
    seg = SEGMENTER.from_spec(TINY, {**GEOM, "short_side": 20, "evidence_dtype": "float32"})
    ev = seg.extract(image, CLASSES)
    assert ev.meta["grid"] == [1, 1, 3, 4]                  # 20 x 28 -> padded 24 x 32
    p = params(attention="cra", layer=3)
    want = full_forward_probs(seg, image, CLASSES, p)
    assert (seg.decode_probs(ev, p) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("hw", [(40, 57), (31, 90), (64, 64)])
def test_label_map_has_image_shape_and_range(seg32, hw):
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    for cs in (CLASSES, ClassSet.from_names(["sky", "tree"])):
        out = seg32.decode(seg32.extract(img, cs), params(bg_threshold=0.6))
        assert out.shape == hw and out.dtype == np.int64
        assert 0 <= out.min() and out.max() < len(cs.names)


def test_background_threshold(seg32, image):
    ev = seg32.extract(image, CLASSES)
    top = seg32.decode_probs(ev, params()).max(0).values
    s = top.flatten().sort().values
    k = next(i for i in range(len(s) // 2, len(s) - 1) if s[i + 1] - s[i] > 1e-5)
    thr = float(s[k] + s[k + 1]) / 2                        # about half the pixels, no near-ties
    out = seg32.decode(ev, params(bg_threshold=thr))
    assert np.array_equal(out == 0, (top < thr).numpy())
    assert 0.3 < (out == 0).mean() < 0.7
    assert (seg32.decode(ev, params(bg_threshold=0.0)) > 0).all()


def test_float16_evidence_relative_error_below_1e3(seg32, image):
    seg16 = SEGMENTER.from_spec(TINY, {**GEOM, "evidence_dtype": "float16"})
    ev16, ev32 = seg16.extract(image, CLASSES), seg32.extract(image, CLASSES)
    for name in ("key_gram", "values", "value_last", "final_keys", "fixed_cos"):
        a, b = ev16.tensors[name], ev32.tensors[name]
        assert a.dtype == torch.float16 and b.dtype == torch.float32
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 1e-3, (name, rel)
    assert ev16.nbytes() < 0.6 * ev32.nbytes()


def test_evidence_round_trips_through_safetensors(seg32, image):
    from safetensors.torch import load, save

    ev = seg32.extract(image, CLASSES)
    tensors, meta = ev.to_safetensors_dict()
    back = Evidence.from_safetensors_dict(load(save(tensors, metadata=meta)), meta)
    assert np.array_equal(seg32.decode(back, params()), seg32.decode(ev, params()))


def test_text_embeddings_are_computed_once_per_class_set(monkeypatch, image):
    import methods.clipseg.segmenter as mod

    seg = SEGMENTER.from_spec(TINY, GEOM)
    calls = []
    real = mod.name_embeddings
    monkeypatch.setattr(mod, "name_embeddings",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    e1, e2 = seg.extract(image, CLASSES), seg.extract(image[::-1].copy(), CLASSES)
    assert len(calls) == 1 and torch.equal(e1.tensors["text"], e2.tensors["text"])
    seg.extract(image, ClassSet.from_names(["cat"]))
    assert len(calls) == 2


def test_settings_key_tracks_extraction_settings_only(seg32):
    other = SEGMENTER.from_spec(TINY, {**GEOM, "evidence_dtype": "float32", "short_side": 64})
    decode_only = SEGMENTER.from_spec(TINY, {**GEOM, "evidence_dtype": "float32",
                                             "logit_scale": 60.0})
    assert seg32.settings_key() != other.settings_key()
    assert seg32.settings_key() == decode_only.settings_key()


# --- errors --------------------------------------------------------------------------------
def test_loading_errors_name_the_thing(tmp_path):
    with pytest.raises(OvssError, match="ViT-Q-99"):
        SEGMENTER.from_spec({"name": "x", "model": "ViT-Q-99", "pretrained": "openai"}, {})
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(OvssError, match="nope.safetensors"):
        SEGMENTER.from_spec({"name": "x", "model": "ViT-B-16", "path": str(missing)}, {})
    with pytest.raises(OvssError, match="no_such_tag"):
        SEGMENTER.from_spec({"name": "x", "model": "ViT-B-16", "pretrained": "no_such_tag"}, {})
    with pytest.raises(OvssError, match="widht"):
        SEGMENTER.from_spec({"name": "tiny", "tiny": {"widht": 8}}, {})
    with pytest.raises(OvssError, match="short_sid"):
        SEGMENTER.from_spec(TINY, {"short_sid": 4})


def test_bad_knobs_raise(seg32, image):
    ev = seg32.extract(image, CLASSES)
    for bad in ({"layer": 5}, {"layer": 0}, {"attention": "vv"}, {"dsi_start": -5}):
        with pytest.raises(OvssError):
            seg32.decode(ev, params(**bad))


def test_local_checkpoint_path_loads_its_weights(tmp_path, seg32):
    path = tmp_path / "tiny.pt"
    torch.save(seg32.model.state_dict(), path)
    name = seg32.model_name
    seg = SEGMENTER.from_spec({"name": "local", "model": name, "path": str(path)}, GEOM)
    for a, b in zip(seg.model.state_dict().values(), seg32.model.state_dict().values()):
        assert torch.equal(a, b)


# --- the YAML ------------------------------------------------------------------------------
def test_yaml_spec_and_smoke_preset_decode_speed():
    from methods.spec import load_method_spec
    from search.core.config import resolve

    spec = load_method_spec("clipseg")
    for name in spec.backbones:
        r = resolve(spec, backbone=name, dataset="voc21")
        assert set(r.defaults) >= {"layer", "tau", "epsilon", "dsi_start", "attention",
                                   "bg_threshold"}
        assert set(r.space["attention"].choices) == set(DEFAULT_VARIANTS)
    preset = spec.presets["smoke"]
    r = resolve(spec, backbone=preset.backbone, dataset=preset.dataset, preset=preset)
    seg = SEGMENTER.from_spec(r.backbone, r.settings)
    assert r.space["layer"].high == seg.num_layers - 1
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    voc = ClassSet.from_names([f"class {i}" for i in range(20)], background=True)
    ev = seg.extract(img, voc)
    p = dict(r.defaults)
    seg.decode(ev, p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # as in a one-CPU Ray trial, and robust to a busy machine
    try:
        best = min(_timed(lambda: seg.decode(ev, p)) for _ in range(10))
    finally:
        torch.set_num_threads(threads)
    assert best < 0.05, f"smoke decode took {best * 1000:.0f} ms"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
