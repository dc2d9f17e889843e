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

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError
from methods.clipseg import SEGMENTER
from methods.clipseg.protocols import reference_names

# CLIP's and DINO's native grids are 7 x 7 at 56 px: windows of 56 need no positional
# interpolation on CLIP's side (ProxyCLIP resizes it with scale_factor (g + 0.1) / sqrt(N), we
# by size: the family's documented difference, docs/clipseg.md).
TINY_CLIP = {"name": "tiny56", "tiny": {"width": 64, "layers": 4, "heads": 4, "patch_size": 8,
                                        "image_size": 56}}
VISION = {
    "dino": {"arch": "dino", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                      "image_size": 56}},
    "reg": {"arch": "dinov2_reg", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                           "image_size": 56}},
    "sam": {"arch": "sam", "tiny": {}},
}
SETTINGS = {"protocol": "proxyclip", "dataset": "voc21", "short_side": 56, "window": 56,
            "stride": 28, "templates": "simple", "evidence_dtype": "float32",
            "vision": ["dino", "reg", "sam"], "vision_models": VISION, "family": False}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases, LayerNorm gains, layer scales and relative positions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:                                    # gains, layer scales
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "rel_pos" in name or "token" in name or "position" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def build(settings: dict) -> object:
    s = SEGMENTER.from_spec(TINY_CLIP, settings)
    randomise(s.model.visual, 7)
    vision = {n: s.vision(n) for n in settings["vision"] + ([settings["sam"]]
                                                           if settings.get("sam") else [])}
    for i, m in enumerate(vision.values()):
        randomise(m.module, 11 + i)
    return type(s)(s.model, s.model_name, TINY_CLIP, settings, vision=vision)


@pytest.fixture(scope="module")
def seg():
    return build(SETTINGS)


@pytest.fixture(scope="module")
def voc():
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    return ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)


def image(h: int, w: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3)).astype(np.float32)
    big = F.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w),
                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return (big + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def params(**kw):
    base = {"attention": "proxyclip", "beta": 1.2, "gamma": 3.0, "vision": "dino",
            "bg_threshold": 0.2, "logit_scale": 40.0, "layer": 2, "tau": 6.0, "epsilon": 0.75,
            "dsi_start": -1, "min_pts": 3, "gaussian_std": 5.0, "cos_fac": 1.2,
            "refine_neg_cos": True, "sam_refine": False, "sam_iou_thresh": 0.8,
            "coarse_thresh": 0.2, "minimal_area": 225, "sam_mask_coff": 0.005}
    return {**base, **kw}


# --- transcriptions of the official code --------------------------------------------------
def dino_official(vit, x):
    """dino VisionTransformer.get_intermediate_layers(x)[0] (vision_transformer.py 174-233) on
    the weights of a transformers ViTModel: qkv as one projection, (q @ k^T) * scale."""
    b, _, w, h = x.shape
    emb = vit.embeddings
    patch = vit.config.patch_size
    t = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
    t = torch.cat((emb.cls_token.expand(b, -1, -1), t), dim=1)
    pos = emb.position_embeddings
    n = pos.shape[1] - 1
    if not (t.shape[1] - 1 == n and w == h):
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        pp = F.interpolate(pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1)
                           .permute(0, 3, 1, 2),
                           scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        pos = torch.cat((pos[:, 0].unsqueeze(0), pp.permute(0, 2, 3, 1).view(1, -1, pos.shape[-1])),
                        dim=1)
    t = t + pos
    for blk in vit.layers:
        a = blk.attention
        heads = a.config.num_attention_heads
        y = blk.layernorm_before(t)
        qkv = torch.cat([F.linear(y, a.q_proj.weight, a.q_proj.bias),
                         F.linear(y, a.k_proj.weight, a.k_proj.bias),
                         F.linear(y, a.v_proj.weight, a.v_proj.bias)], dim=-1)
        bn, nt, c = y.shape
        qkv = qkv.reshape(bn, nt, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        y = a.o_proj((att @ v).transpose(1, 2).reshape(bn, nt, c))
        t = t + y
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.layernorm_after(t))))
    return vit.layernorm(t)


def dinov2_official(model, x):
    """dinov2 get_intermediate_layers(x, reshape=True)[0] (prepare_tokens_with_masks: the
    registers after the class token, after the positional embedding; norm; patches only)."""
    emb = model.embeddings
    b, _, h, w = x.shape
    t = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
    t = torch.cat((emb.cls_token.expand(b, -1, -1), t), dim=1)
    n = emb.position_embeddings.shape[1] - 1
    m = int(math.sqrt(n))
    patch = model.config.patch_size
    pos = emb.position_embeddings
    if not (t.shape[1] - 1 == n and w == h):              # interpolate_offset 0, antialias
        pp = F.interpolate(pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2),
                           size=(h // patch, w // patch), mode="bicubic", antialias=True)
        pos = torch.cat((pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), 1)
    t = t + pos
    t = torch.cat((t[:, :1], emb.register_tokens.expand(b, -1, -1), t[:, 1:]), dim=1)
    for blk in model.encoder.layer:
        a = blk.attention
        heads = a.config.num_attention_heads
        y = blk.norm1(t)
        bn, nt, c = y.shape
        q, k, v = (F.linear(y, p.weight, p.bias).reshape(bn, nt, heads, c // heads)
                   .transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        att = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + blk.layer_scale1.lambda1 * a.o_proj((att @ v).transpose(1, 2).reshape(bn, nt, c))
        t = t + blk.layer_scale2.lambda1 * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    t = model.layernorm(t)[:, 1 + emb.register_tokens.shape[1]:]
    return t.reshape(b, h // patch, w // patch, -1).permute(0, 3, 1, 2)


def custom_attn_official(attn_layer, x, ex_feats, beta, gamma, token_size):
    """ProxyCLIP transformer.py 560-587."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(
        0, 3, 1, 2)
    v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def encode_image_official(visual, x, ex_feats, beta, gamma):
    """ProxyCLIP VisionTransformer.forward (transformer.py 503-538), native grid."""
    B, nc, w, h = x.shape
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
    assert x.shape[1] == visual.positional_embedding.shape[0]
    x = visual.ln_pre(x + visual.positional_embedding)
    token_size = h // visual.patch_size[0], w // visual.patch_size[1]
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)                                      # open_clip 3.x blocks are batch-first
    x = x.permute(1, 0, 2)                              # NLD -> LND, as ProxyCLIP runs them
    blk = visual.transformer.resblocks[-1]
    x = custom_attn_official(blk.attn, blk.ln_1(x), ex_feats, beta, gamma, token_size)
    x = x.permute(1, 0, 2)
    return visual.ln_post(x) @ visual.proj


def forward_feature_official(seg, img, vfm, text, beta, gamma):
    """proxyclip_segmentor.py 106-186 for the dino / dinov2 / sam branches."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    inorm = (torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
             torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    imgs_norm = torch.stack([((i * std + mean) - inorm[0]) / inorm[1] for i in img])
    if vfm.arch == "sam":
        imgs_norm = F.interpolate(imgs_norm, size=(vfm.input_size, vfm.input_size),
                                  mode="bilinear", align_corners=False)
        ex_feats = vfm.module.image_encoder(imgs_norm)
        I = J = vfm.input_size // 16                                       # noqa: E741
    elif vfm.arch == "dino":
        feat = dino_official(vfm.module, imgs_norm)
        I = J = imgs_norm[0].shape[-2] // vfm.patch                        # noqa: E741
        ex_feats = feat[:, 1:, :].reshape(feat.shape[0], I, J, -1).permute(0, 3, 1, 2)
    else:
        ex_feats = dinov2_official(vfm.module, imgs_norm)
        I, J = ex_feats.shape[-2:]                                         # noqa: E741
    feats = encode_image_official(seg.visual, img, ex_feats, beta, gamma)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ text.T
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], I, J)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def compute_padsize(H, W, patch_size):
    l, r, t, b = 0, 0, 0, 0                                               # noqa: E741
    if W % patch_size:
        lr = patch_size - (W % patch_size)
        l = lr // 2                                                       # noqa: E741
        r = lr - l
    if H % patch_size:
        tb = patch_size - (H % patch_size)
        t = tb // 2
        b = tb - t
    return l, r, t, b


def slide_official(seg, img, vfm, text, beta, gamma, stride, crop, ori):
    """proxyclip_segmentor.py 188-244."""
    h_stride = w_stride = stride
    h_crop = w_crop = crop
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((1, len(text), h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            H, W = crop_img.shape[2:]
            pad = compute_padsize(H, W, 56)
            if any(pad):
                crop_img = F.pad(crop_img, pad)
            logit = forward_feature_official(seg, crop_img, vfm, text, beta, gamma)
            if any(pad):
                logit = logit[:, :, pad[2]:pad[2] + H, pad[0]:pad[0] + W]
            preds += F.pad(logit, (int(x1), int(preds.shape[3] - x2), int(y1),
                                   int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count_mat, size=ori, mode="bilinear")


def official_probs(seg, img_np, p, dataset="voc21"):
    """ProxyCLIP on one image: class probabilities (num_cls x H x W) and seg_pred."""
    names = reference_names("proxyclip", dataset)
    words = [n for line in names for n in line]
    idx = torch.tensor([i for i, line in enumerate(names) for _ in line])
    text = seg.text_embeddings(words)
    img = seg.preprocess(img_np)[None]
    vfm = seg.vision(p["vision"])
    logits = slide_official(seg, img, vfm, text, p["beta"], p["gamma"],
                            seg.settings["stride"], seg.settings["window"], img_np.shape[:2])
    seg_logits = (logits[0] * p["logit_scale"]).softmax(0)
    num_cls = int(idx.max()) + 1
    if num_cls != len(idx):
        cls_index = F.one_hot(idx).T.view(num_cls, len(idx), 1, 1)
        seg_logits = (seg_logits.unsqueeze(0) * cls_index).max(1)[0]
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < p["bg_threshold"]] = 0
    return seg_logits, seg_pred[0].numpy()


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
    assert "key_gram" not in ev.tensors                                 # family: false
    key = seg.settings_key()
    assert key["vision_models"]["dino"] == VISION["dino"] and key["vision"] == ["dino", "reg",
                                                                             "sam"]
    with pytest.raises(OvssError, match="not extracted"):
        seg.decode(ev, params(vision="other"))
    with pytest.raises(OvssError, match="family"):
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
