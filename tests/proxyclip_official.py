"""A direct transcription of the official ProxyCLIP code (mc-lan/ProxyCLIP e7b767f
``open_clip/transformer.py`` 503-587, ``proxyclip_segmentor.py`` 106-340) and of DINO's and
DINOv2's forwards (facebookresearch/dino 7c446df ``vision_transformer.py`` 174-233,
facebookresearch/dinov2 ``vision_transformer.py`` prepare_tokens_with_masks /
get_intermediate_layers) on the weights of transformers' classes, written without our formula
functions. Used by tests/test_clipseg_proxy.py and tests/test_clipseg_trident.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.clipseg.protocols import reference_names
from tests.second_models import CLIP_MEAN, CLIP_STD


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


