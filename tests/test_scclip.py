"""SC-CLIP (``attention: scclip``) against a direct transcription of its official forward
(SuleBai/SC-CLIP 0417ba9 clip/model.py 208-227 ``lof_pytorch``, 254-316 ``forward``, 318-341
``custom_attn``, 343-346 ``adaptively_aggregate``, 348-373 ``mean_interpolation``), written here
sequence-first with the official helpers' own operations (norm of differences, conv2d of a
3 x 3 kernel, bmm over heads folded into the batch) and none of our functions; on a
random-weight open_clip ViT with 4 heads and randomised biases and LayerNorm gains. Plus the
compact evidence (stored layer ranges, fused pieces), every knob's effect, and decode from the
decode head; the search side (reach settings, refusals, a smoke search) is test_scclip_search.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError
from methods.clipseg import SEGMENTER
from methods.clipseg.scclip import (
    anomalous_tokens,
    fill_anomalies,
    fused_pieces,
    fused_sum,
    lof_scores,
)
from methods.clipseg.windows import window_batch, window_grid
from tests.test_clipseg_family import params, randomise

#: 5 blocks (X_0..X_3), 4 heads, patch 4: a 32 px window has 64 patches (LOF's 30 neighbours).
TINY = {"name": "tiny-sc", "tiny": {"width": 64, "layers": 5, "heads": 4, "patch_size": 4,
                                    "image_size": 32}}
SETTINGS = {"protocol": "custom", "short_side": 32, "window": 32, "stride": 16,
            "logit_scale": 40.0, "templates": "simple", "evidence_dtype": "float32",
            "variants": ["scclip"]}
CLASSES = ClassSet.from_names(["cat", "dog", "tree", "road"])
#: (pre_adjust_idx, post_adjust_idx, multi_start_idx, multi_end_idx, res_cls, beta, gamma)
KNOBS = [(2, 1, 0, 3, 0.3, 0.4, 3.0), (3, 0, 1, 4, 0.6, 0.3, 2.0), (0, 2, 2, 3, 0.0, 0.6, 3.0)]


def sc_params(pre, post, start, end, res, beta, gamma, **kw):
    return params(attention="scclip", pre_adjust_idx=pre, post_adjust_idx=post,
                  multi_start_idx=start, multi_end_idx=end, res_cls=res, adjust_beta=beta,
                  mid_gamma=gamma, **kw)


@pytest.fixture(scope="module")
def seg():
    s = SEGMENTER.from_spec(TINY, SETTINGS)
    randomise(s.model)
    return type(s)(s.model, s.model_name, TINY, SETTINGS)


@pytest.fixture(scope="module")
def image():
    from tests.test_contract import structured_image

    return structured_image((32, 48), seed=3)             # 2 windows of 32 px, stride 16


# --- the official code, transcribed (sequence-first x: T x B x D, B = 1) -----------------------
def lof_pytorch(x, n_neighbors=30, contamination=0.05):
    distances = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    knn_distances, knn_indices = torch.topk(distances, k=n_neighbors + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]
    k_distances = knn_distances[:, -1].unsqueeze(1).expand_as(knn_distances)
    reach_distances = torch.max(knn_distances, k_distances)
    lrd = n_neighbors / torch.nan_to_num(reach_distances.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)
    threshold = torch.quantile(lof.to(torch.float32), 1 - contamination)
    return torch.where(lof > threshold)[0], lof


def mean_interpolation(feature_map, top_indices):
    b, c, h, w = feature_map.shape
    kernel = torch.ones(c, 1, 3, 3)
    kernel[:, 0, 1, 1] = 0
    mask = torch.ones((h, w))
    indices = torch.tensor(top_indices, dtype=torch.long)
    mask[indices[:, 0], indices[:, 1]] = 0
    mask = mask[None, None]
    neighbor_sum = F.conv2d(F.pad(feature_map * mask, (1, 1, 1, 1)), kernel, groups=c)
    valid = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1], groups=1)
    valid_mask = (valid > 0).float()
    safe = valid.clone()
    safe[safe == 0] = 1
    mean_neighbors = neighbor_sum / safe
    top = torch.zeros((h, w))
    top[indices[:, 0], indices[:, 1]] = 1
    update = top[None, None] * valid_mask
    return feature_map * (1 - update) + mean_neighbors * update


def custom_attn(attn_layer, x, mid_simi, gamma):
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    mid_simi = (mid_simi - torch.mean(mid_simi)) * gamma
    mid_simi[mid_simi < 0.0] = float("-inf")
    attn_weights = F.softmax(mid_simi.repeat(num_heads, 1, 1), dim=-1)
    attn_weights += F.softmax(torch.bmm(k, k.transpose(1, 2)) * head_dim ** -0.5, dim=-1)
    attn_weights /= 2
    out = torch.bmm(attn_weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


def adaptively_aggregate(feats, corrs):
    corrs_normalized = corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.matmul(corrs_normalized, feats.permute(1, 0, 2)).permute(1, 0, 2)


@torch.no_grad()
def official_forward(model, pixels, pre, post, start, end, res_cls, beta, gamma):
    """VisionTransformer.forward(x, return_all=True) of one window: P x E features."""
    v = model.visual
    width = v.conv1.out_channels
    x = v.conv1(pixels)
    feat_w, feat_h = x.shape[-2], x.shape[-1]
    x = x.reshape(1, width, -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(1, 1, width), x], dim=1)
    x = v.ln_pre(x + v.positional_embedding)             # the window is the native size
    x = x.permute(1, 0, 2)
    blocks = v.transformer.resblocks
    feats_list = []
    for idx, blk in enumerate(blocks[:-1], start=1):
        x = blk(x.permute(1, 0, 2)).permute(1, 0, 2)     # open_clip 3.x blocks: batch-first
        feats_list.append(x)
        if idx == len(blocks) - 1:
            cls_token = x[:1]
            outliers, _ = lof_pytorch(x[1:].squeeze(1))
            top_indices = [(torch.div(i, feat_w, rounding_mode="trunc"), i % feat_w)
                           for i in outliers]
            fm = x[1:].permute(1, 2, 0).reshape(1, width, feat_w, feat_h)
            x = mean_interpolation(fm, top_indices).reshape(1, width, -1).permute(2, 0, 1)
    feats = feats_list[pre][1:].clone().permute(1, 2, 0).reshape(1, width, feat_w, feat_h)
    feats = mean_interpolation(feats, top_indices).reshape(1, width, -1).permute(2, 0, 1)
    feats = feats / feats.norm(dim=2, keepdim=True)
    before = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    mid = before.clone()
    before[before < beta] = 0.0
    x = adaptively_aggregate(x, before)
    blk = blocks[-1]
    x = custom_attn(blk.attn, blk.ln_1(x), mid, gamma) + res_cls * cls_token
    feats = feats_list[post][1:].clone()
    feats = feats / feats.norm(dim=2, keepdim=True)
    after = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    after[after < beta] = 0.0
    x = adaptively_aggregate(x, after)
    re_feats = torch.zeros_like(feats_list[0])
    for i in range(start, end):
        re_feats += feats_list[i]
    cls_token = re_feats[:1]
    re_feats = custom_attn(blk.attn, blk.ln_1(re_feats[1:]), mid, gamma) + res_cls * cls_token
    x += adaptively_aggregate(re_feats, after)
    return (v.ln_post(x.permute(1, 0, 2)) @ v.proj)[0]


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", KNOBS)
def test_scclip_equals_official_forward(seg, image, knobs):
    ev = seg.extract(image, CLASSES)
    got = seg.window_cosines(ev, sc_params(*knobs))                # W x P x N
    pixels = seg.preprocess(image)
    grid = window_grid(tuple(pixels.shape[1:]), 32, 16, 4)
    windows = window_batch(pixels, grid)
    assert got.shape == (2, 64, 4)
    for w in range(len(windows)):
        feats = official_forward(seg.model, windows[w:w + 1], *knobs)
        want = F.normalize(feats, dim=-1) @ ev.tensors["text"].T
        assert (got[w] - want).abs().max().item() < 1e-5, w
    # every step can matter here: tokens were flagged, and both adjustments keep some entries
    # and zero others
    assert 0 < int(ev.tensors["sc_flags"].sum()) < 64
    for key in ("sc_gram_pre", "sc_gram_post"):
        below = (ev.tensors[key] < knobs[5]).float().mean().item()
        assert 0.05 < below < 0.95, (key, below)


def test_lof_and_fill_equal_the_official_helpers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 48, 16, generator=gen)
    x[:, 7] += 6.0                                       # two clear outliers per window, one
    x[:, 8] += 6.0                                       # next to the other, one at a border
    x[:, 47] -= 8.0
    flags = anomalous_tokens(x, 30, 0.05)
    for b in range(3):
        idx, scores = lof_pytorch(x[b])
        assert torch.allclose(lof_scores(x[b:b + 1], 30)[0], scores, rtol=1e-5)
        assert torch.equal(torch.where(flags[b])[0], idx)
        # mean_interpolation on a square 6 x 8 grid? the official index map needs gh == gw
    sq = torch.randn(2, 36, 5, generator=gen)
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[:, [0, 1, 6, 14, 35]] = True
    mask[1, [2, 7, 12, 13]] = True                       # token 1 and 6 lose more neighbours
    got = fill_anomalies(sq, mask, (6, 6))
    for b in range(2):
        idx = torch.where(mask[b])[0]
        top = [(torch.div(i, 6, rounding_mode="trunc"), i % 6) for i in idx]
        fm = sq[b].T.reshape(1, 5, 6, 6)
        want = mean_interpolation(fm, top).reshape(5, 36).T
        assert torch.allclose(got[b], want, atol=1e-6)
    assert not torch.allclose(got, sq)
    # a flagged token whose 8 neighbours are all flagged keeps its value
    allf = torch.ones(1, 9, dtype=torch.bool)
    assert torch.equal(fill_anomalies(sq[:1, :9], allf, (3, 3)), sq[:1, :9])


def test_lof_clamps_its_neighbours_to_the_patches():
    """The official code fails with P <= 30 patches (topk of 31); we take P - 1 neighbours,
    which is the official computation with n_neighbors = P - 1."""
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(5))
    _, want = lof_pytorch(x[0], n_neighbors=15)
    assert torch.allclose(lof_scores(x, 30)[0], want, rtol=1e-5)


def test_fused_pieces_give_every_reachable_sum():
    stream = torch.randn(11, 2, 5, 3, generator=torch.Generator().manual_seed(1))
    for start, end in [((1, 5), (8, 11)), ((0, 6), (2, 11)), ((3, 3), (10, 10))]:
        pieces = fused_pieces(start, end)
        fuse = torch.stack([stream[a:b].sum(0) for a, b in pieces])
        for s in range(start[0], start[1] + 1):
            for e in range(max(end[0], s + 1), end[1] + 1):
                assert torch.allclose(fused_sum(fuse, pieces, s, e), stream[s:e].sum(0),
                                      atol=1e-6), (s, e)
    assert len(fused_pieces((1, 5), (8, 11))) == 8          # 4 + the core [5, 8) + 3


def test_evidence_holds_only_the_reachable_layers(image):
    layers = {"pre": [2, 3], "post": [1, 1], "start": [1, 2], "end": [3, 4]}
    full = SEGMENTER.from_spec(TINY, SETTINGS)
    part = SEGMENTER.from_spec(TINY, {**SETTINGS, "scclip_layers": layers})
    e_full, e_part = full.extract(image, CLASSES), part.extract(image, CLASSES)
    assert e_part.tensors["sc_gram_pre"].shape[0] == 2
    assert e_part.tensors["sc_gram_post"].shape[0] == 1
    assert e_part.meta["sc_pieces"] == [[1, 2], [2, 3], [3, 4]]
    assert e_part.nbytes() < e_full.nbytes()
    assert "key_gram" not in e_part.tensors and "fixed_cos" not in e_part.tensors
    for knobs in [(2, 1, 1, 3, 0.3, 0.4, 3.0), (3, 1, 2, 4, 0.1, 0.5, 2.0)]:
        p = sc_params(*knobs)
        assert torch.allclose(part.window_cosines(e_part, p), full.window_cosines(e_full, p),
                              atol=1e-6)
    with pytest.raises(OvssError, match="pre_adjust_idx=0 is not in this evidence"):
        part.decode(e_part, sc_params(0, 1, 1, 3, 0.3, 0.4, 3.0))
    with pytest.raises(OvssError, match="attention=cra"):     # not extracted for cra
        part.decode(e_part, params(attention="cra"))
    with pytest.raises(OvssError, match="multi_end_idx"):
        full.decode(e_full, sc_params(2, 1, 3, 3, 0.3, 0.4, 3.0))


def test_every_knob_changes_the_output(seg, image):
    ev = seg.extract(image, CLASSES)
    base = KNOBS[0]
    ref = seg.window_cosines(ev, sc_params(*base))
    for i, other in enumerate([3, 0, 1, 4, 0.0, 0.5, 1.5]):
        knobs = list(base)
        knobs[i] = other
        assert (seg.window_cosines(ev, sc_params(*knobs)) - ref).abs().max() > 1e-4, i


def test_decode_from_the_head_equals_the_full_segmenter(seg, image):
    ev = seg.extract(image, CLASSES)
    light = SEGMENTER.from_decode_state(TINY, SETTINGS, seg.decode_state())
    p = sc_params(*KNOBS[1], pamr_steps=3, pamr_dilations="1,2")
    assert torch.equal(light.scaled_logits(ev, p), seg.scaled_logits(ev, p))
    assert not light.model_built


def test_quantile_threshold_is_strict():
    """At P = 41 the 95 % quantile is a score itself (0.95 x 40 = 38): the official ``>``
    flags 2 tokens where ``>=`` would flag 3."""
    x = torch.randn(2, 41, 8, generator=torch.Generator().manual_seed(9))
    flags = anomalous_tokens(x, 30, 0.05)
    for b in range(2):
        idx, _ = lof_pytorch(x[b])
        assert torch.equal(torch.where(flags[b])[0], idx) and len(idx) == 2


def test_adjust_weights_and_attention_equal_the_official_helpers():
    """Cases the model-level test cannot reach: a row whose kept weights sum to ~1e-6 (the
    official + 1e-6), and similarities exactly at their mean (kept: the official masks < 0)."""
    from methods.clipseg.scclip import FinalAttention, adjust_weights, self_calibrated_attention

    m = torch.tensor([[[1e-6, 0.0, 0.0], [0.3, 1.0, 0.5], [0.0, 0.5, 1.0]]])
    feats = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(0))   # T x B x D
    want = adaptively_aggregate(feats, torch.where(m < -1.0, 0.0, m)).permute(1, 0, 2)
    assert torch.allclose(adjust_weights(m, -1.0) @ feats.permute(1, 0, 2), want, atol=1e-7)
    # 4 x 4, mean exactly 0.5: the four 0.5 entries sit at the mean
    m = torch.tensor([[[1.0, 0.5, 1.0, 0.0], [0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5],
                       [0.0, 0.0, 0.5, 1.0]]])
    assert m.mean().item() == 0.5
    layer = torch.nn.MultiheadAttention(8, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ln = torch.nn.LayerNorm(8)
    x = torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(3))           # T x B x D
    want = custom_attn(layer, ln(x), m.clone(), 3.0)[:, 0]
    w, b = layer.in_proj_weight, layer.in_proj_bias
    block = FinalAttention(ln, w[8:16], b[8:16], w[16:], b[16:], layer.out_proj, 2)
    got = self_calibrated_attention(x.permute(1, 0, 2), m, block, 3.0)[0]
    assert torch.allclose(got, want, atol=1e-5)

