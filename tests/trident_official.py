"""A direct transcription of the official Trident code (YuHengsss/Trident a93b346
``trident.py`` 112-283, ``open_clip/transformer.py`` 502-659, ``segment_anything/modeling/
image_encoder.py`` 226-243, ``seg_utils/utils.py`` 9-25) written without our formula functions.
Where a tiny model forces it: CLIP's patch 8 (Trident's ``clip_stride`` 16), SAM's grid 8
(``sam_hw = 64``). Used by tests/test_clipseg_trident.py."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from methods.clipseg.protocols import reference_names
from tests.proxyclip_official import compute_padsize, dino_official
from tests.second_models import CLIP_MEAN, CLIP_STD


def mmseg_pixels(seg, img):
    """The protocol's resize (short side) and CLIP normalisation, shared by the family."""
    from methods.clipseg.windows import resize_image, resized_size

    size = resized_size(*img.shape[:2], int(seg.settings["short_side"]))
    x = torch.from_numpy(np.ascontiguousarray(resize_image(img, size))).permute(2, 0, 1)
    return (x.float() / 255.0 - seg.mean) / seg.std


def preprocess_image(image, stride=16, slide_crop=336):
    """seg_utils/utils.py 9-25."""
    longer_side = max(image.shape[2:])
    h, w = image.shape[2:]
    if h % stride == 0 and w % stride == 0:
        return image
    if longer_side % stride != 0:
        dst_longer = (longer_side // stride + 1) * stride
    else:
        dst_longer = longer_side
    new_h = int(h * dst_longer / longer_side)
    new_w = int(w * dst_longer / longer_side)
    if new_h % stride != 0:
        new_h = (new_h // stride + 1) * stride
    if new_w % stride != 0:
        new_w = (new_w // stride + 1) * stride
    new_h, new_w = max(new_h, slide_crop), max(new_w, slide_crop)
    return F.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False)


def last_block_official(sam, x):
    """Trident's Attention.forward with return_attn (image_encoder.py 226-243)."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    a = sam.image_encoder.blocks[-1].attn
    B, H, W, _ = x.shape
    qkv = a.qkv(x).reshape(B, H * W, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * a.num_heads, H * W, -1).unbind(0)
    attn = (q * a.scale) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, a.rel_pos_h, a.rel_pos_w, (H, W), (H, W))
    attn = attn.softmax(dim=-1)
    return attn, v.view(B, a.num_heads, H, W, -1)


def get_sam_feat_official(predictor, tmp_img, stride):
    """trident.py 112-128 (the encoder's last attention captured at its input)."""
    seen = {}
    blk = predictor.model.image_encoder.blocks[-1]
    hook = blk.attn.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    predictor.set_image(tmp_img)
    hook.remove()
    last_attn, last_v = last_block_official(predictor.model, seen["x"])
    heads = blk.attn.num_heads
    vh = int(1.0 * predictor.input_size[0] // stride)
    vw = int(1.0 * predictor.input_size[1] // stride)
    hw = predictor.model.image_encoder.img_size // 16                   # Trident: 64
    sam_attn = last_attn.view(1, heads, hw, hw, hw, hw)[:, :, :vh, :vw, :vh, :vw]
    sam_attn = sam_attn.flatten(2, 3).flatten(3, 4)
    sam_v = last_v[:, :, :vh, :vw, :]
    return sam_attn, sam_v, vh, vw


def get_sam_sim(sam_v, sam_attn, cos_fac, heads, refine_neg_cos=True):
    """transformer.py 643-659."""
    sam_v = sam_v.flatten(2, 3)
    sam_v = F.normalize(sam_v, dim=-1)
    sam_sim = torch.einsum("b h m c, b h n c -> b h m n", sam_v, sam_v)
    sim_thresh = cos_fac * sam_sim.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        sim_thresh = torch.where(sim_thresh < 0.0, 0.6, sim_thresh)
    sim_thresh = torch.where(sim_thresh > 0.9, 0.9, sim_thresh)
    refined = torch.where(sam_sim > sim_thresh, sam_attn, torch.zeros_like(sam_attn))
    refined = refined.mean(dim=1)
    similarity = refined / refined.sum(dim=-1, keepdim=True)
    return similarity.unsqueeze(0).repeat(1, heads, 1, 1)


def custom_attn_official(attn_layer, x, ex_feats, beta, gamma, token_size):
    """transformer.py 557-584 (the class token already dropped)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v.reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def guidance_attn_official(attn_layer, x, token_size, win_sizes, dst_coords, cos_fac, sam_attn,
                           sam_v, vfm_token_size, dst_vh, dst_vw, refine_neg_cos):
    """transformer.py 586-640."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    win_h, win_w = win_sizes
    dst_coords = torch.stack(dst_coords)
    v = x
    v = v.view(-1, bsz, num_heads, head_dim).permute(1, 2, 0, 3).contiguous()
    v = v.permute(2, 0, 1, 3).flatten(2)
    v_img = v.view(vfm_token_size[0], vfm_token_size[1], bsz, embed_dim).permute(
        2, 3, 0, 1).contiguous()
    if v_img.shape[-1] % token_size[1] != 0:
        ratio = int(round(vfm_token_size[0] / token_size[0]))
        v_img = F.interpolate(v_img, size=(token_size[0] * ratio, token_size[1] * ratio),
                              mode="bilinear", align_corners=False)
    else:
        ratio = v_img.shape[-1] // token_size[1]
    dst_v = v.new_zeros(1, embed_dim, dst_vh * ratio, dst_vw * ratio)
    count_mat = v.new_zeros(1, 1, dst_vh * ratio, dst_vw * ratio)
    for h_idx in range(win_h):
        for w_idx in range(win_w):
            coord = dst_coords[h_idx * win_w + w_idx]
            raw_v = v_img[h_idx * win_w + w_idx]
            dst_v[0, :, coord[0] * ratio:coord[2] * ratio,
                  coord[1] * ratio:coord[3] * ratio] += raw_v
            count_mat[:, :, coord[0] * ratio:coord[2] * ratio,
                      coord[1] * ratio:coord[3] * ratio] += 1
    dst_v = dst_v / count_mat
    if type(sam_v) is list:
        w1 = get_sam_sim(sam_v[0], sam_attn[0], cos_fac, num_heads, refine_neg_cos).type_as(v)
        w2 = get_sam_sim(sam_v[1], sam_attn[1], cos_fac, num_heads, refine_neg_cos).type_as(v)
        d1, d2 = dst_v[:, :, :, :dst_v.shape[3] // 2], dst_v[:, :, :, dst_v.shape[3] // 2:]
        d1 = F.interpolate(d1, size=(sam_v[0].shape[2], sam_v[0].shape[3]), mode="bilinear",
                           align_corners=False)
        d2 = F.interpolate(d2, size=(sam_v[1].shape[2], sam_v[1].shape[3]), mode="bilinear",
                           align_corners=False)
        d1 = d1.reshape(1, num_heads, head_dim, -1).permute(0, 1, 3, 2).contiguous()
        d2 = d2.reshape(1, num_heads, head_dim, -1).permute(0, 1, 3, 2).contiguous()
        o1 = torch.matmul(w1, d1).view(1, num_heads, sam_v[0].shape[2], sam_v[0].shape[3],
                                       head_dim)
        o2 = torch.matmul(w2, d2).view(1, num_heads, sam_v[1].shape[2], sam_v[1].shape[3],
                                       head_dim)
        out = torch.cat([o1, o2], dim=-2).flatten(2, 3)
        return out.permute(2, 0, 1, 3).flatten(2).contiguous()
    dst_v = F.interpolate(dst_v, size=(sam_v.shape[2], sam_v.shape[3]), mode="bilinear",
                          align_corners=False)
    attn_weights = get_sam_sim(sam_v, sam_attn, cos_fac, num_heads, refine_neg_cos).type_as(v)
    dst_v = dst_v.view(1, num_heads, head_dim, -1).permute(0, 1, 3, 2).contiguous()
    attn_output = torch.matmul(attn_weights, dst_v)
    return attn_output.permute(2, 0, 1, 3).flatten(2).contiguous()


def encode_image_official(visual, x, ex_feats, beta, gamma, **kw):
    """transformer.py 502-535 (native positional embedding: windows of 56 px)."""
    B, nc, w, h = x.shape
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)
    token_size = h // visual.patch_size[0], w // visual.patch_size[1]
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    x = x.permute(1, 0, 2)
    x = x[1:]
    blk = visual.transformer.resblocks[-1]
    x = custom_attn_official(blk.attn, blk.ln_1(x), ex_feats, beta, gamma, token_size)
    x = guidance_attn_official(blk.attn, x, token_size=token_size, **kw)
    x = x.permute(1, 0, 2)
    return visual.ln_post(x) @ visual.proj


def trident_official(seg, img_np, p, split=False):
    """get_trident_seg + postprocess_result (trident.py 130-188, 190-225, 260-283); returns
    the class probabilities (num_cls x H x W), seg_pred and the predictor of the refinement."""
    from segment_anything import SamPredictor

    names = reference_names("proxyclip", "voc21")
    words = [n for line in names for n in line]
    query_idx = [i for i, line in enumerate(names) for _ in line]
    text = seg.text_embeddings(words)
    stride = seg.patch                                    # clip_stride (16 for ViT-B/16)
    sam = seg.vision("sam").module
    predictor = SamPredictor(sam)
    tmp_img = img_np.copy()
    tmp_h, tmp_w = tmp_img.shape[:2]
    if tmp_h % stride != 0:
        tmp_h = (tmp_h // stride + 1) * stride
    if tmp_w % stride != 0:
        tmp_w = (tmp_w // stride + 1) * stride
    tmp_img = cv2.resize(tmp_img, (tmp_w, tmp_h))
    if split:
        a1, v1, vh1, vw1 = get_sam_feat_official(predictor, tmp_img[:, :tmp_w // 2, :], 16)
        a2, v2, vh2, vw2 = get_sam_feat_official(predictor, tmp_img[:, tmp_w // 2:, :], 16)
        sam_attn, sam_v, sam_valid_h, sam_valid_w = [a1, a2], [v1, v2], vh1, vw1 * 2
        predictor.set_image(tmp_img)
    else:
        sam_attn, sam_v, sam_valid_h, sam_valid_w = get_sam_feat_official(predictor, tmp_img,
                                                                         16)
    src_img = mmseg_pixels(seg, img_np)[None]
    crop, slide = seg.settings["window"], seg.settings["stride"]
    processed = preprocess_image(src_img, stride, crop)
    clip_h, clip_w = processed.shape[-2:]
    # get_windowed_imgs (trident.py 190-225)
    h_grids = max(clip_h - crop + slide - 1, 0) // slide + 1
    w_grids = max(clip_w - crop + slide - 1, 0) // slide + 1
    crops, patch_locs = [], []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * slide, w_idx * slide
            y2, x2 = min(y1 + crop, clip_h), min(x1 + crop, clip_w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            assert y1 % stride == 0 and x1 % stride == 0
            patch_locs.append(torch.tensor([y1 // stride, x1 // stride, y2 // stride,
                                            x2 // stride]))
            c = processed[:, :, y1:y2, x1:x2]
            assert not any(compute_padsize(*c.shape[2:], 56))
            crops.append(c)
    img_batch = torch.cat(crops)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    inet = (torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    imgs_norm = torch.stack([((i * std + mean) - inet[0]) / inet[1] for i in img_batch])
    vfm = seg.vision(p["vision"])
    feat = dino_official(vfm.module, imgs_norm)
    vfm_h, vfm_w = imgs_norm[0].shape[-2] // vfm.patch, imgs_norm[0].shape[-1] // vfm.patch
    vfm_feats = feat[:, 1:, :].reshape(len(feat), vfm_h, vfm_w, -1).permute(0, 3, 1, 2)
    feats = encode_image_official(
        seg.visual, img_batch, vfm_feats, p["beta"], p["gamma"], win_sizes=(h_grids, w_grids),
        dst_coords=patch_locs, cos_fac=p["cos_fac"], sam_attn=sam_attn, sam_v=sam_v,
        vfm_token_size=(vfm_h, vfm_w), dst_vh=clip_h // stride, dst_vw=clip_w // stride,
        refine_neg_cos=p["refine_neg_cos"])
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ text.T
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], sam_valid_h, sam_valid_w)
    logits = F.interpolate(logits, size=img_np.shape[:2], mode="bilinear")
    seg_logits = (logits[0] * p["logit_scale"]).softmax(0)
    num_cls, num_queries = max(query_idx) + 1, len(query_idx)
    if num_cls != num_queries:
        seg_fg = seg_logits[-num_cls + 1:]
        seg_bg = seg_logits[:-num_cls + 1].max(0)[0]
        seg_logits = torch.cat([seg_bg.unsqueeze(0), seg_fg], dim=0)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < p["bg_threshold"]] = 0
    return seg_logits, seg_pred, predictor, num_cls


