"""Trident (``attention: trident``) and its SAM refinement, against a direct transcription of
the official code written here without our formula functions: YuHengsss/Trident a93b346
``trident.py`` 112-188 and 190-225 (SAM features, windows), 260-283 (post-processing),
``open_clip/transformer.py`` 502-659 (custom_attn, guidance_attn, get_sam_sim),
``segment_anything/modeling/image_encoder.py`` 226-243 (the last block's attention and values)
and ``seg_utils/utils.py`` 9-197 (preprocess_image, sam_refinement); on random-weight real
classes (open_clip CLIP, transformers ViTModel, segment-anything Sam) with randomised biases,
gains and relative positions. Differences the transcription makes, each because of a tiny
model: CLIP's patch is 8 (Trident's ``clip_stride`` 16), SAM's grid 8 (``sam_hw = 64``), its
mask input 32 x 32 (the literal 256); ``skimage.measure.label(connectivity=2)`` is
``scipy.ndimage.label`` with a 3 x 3 structure (both label 8-connected components)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError
from methods.clipseg.protocols import reference_names
from tests.test_clipseg_proxy import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_CLIP,
    build,
    compute_padsize,
    dino_official,
    image,
    params,
)

VISION = {
    "d8": {"arch": "dino", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                    "image_size": 56}},     # CLIP's grid: ratio 1
    "d4": {"arch": "dino", "tiny": {"hidden": 32, "layers": 1, "heads": 4, "patch": 4,
                                    "image_size": 56}},     # twice CLIP's grid: ratio 2
    "d7": {"arch": "dino", "tiny": {"hidden": 32, "layers": 1, "heads": 4, "patch": 7,
                                    "image_size": 56}},     # 8 vs 7: resized to 7
    "sam": {"arch": "sam", "tiny": {}},
}
SETTINGS = {"protocol": "trident", "dataset": "voc21", "short_side": 56, "window": 56,
            "stride": 24, "align": 8, "templates": "simple", "evidence_dtype": "float32",
            "vision": ["d8", "d4", "d7"], "vision_models": VISION, "sam": "sam",
            "family": False}


def sharp(s):
    """A SAM whose last-block attention is peaked (random weights give near-uniform rows, and
    G would average every token alike): its q / k projections scaled up."""
    attn = s.vision("sam").module.image_encoder.blocks[-1].attn
    with torch.no_grad():
        attn.qkv.weight[: 2 * attn.qkv.in_features] *= 4.0
    return type(s)(s.model, s.model_name, TINY_CLIP, s.settings,
                   vision={n: s.vision(n) for n in s._vision})


@pytest.fixture(scope="module")
def seg():
    return sharp(build(SETTINGS))


@pytest.fixture(scope="module")
def seg_split():
    return sharp(build({**SETTINGS, "sam_split": 2, "vision": ["d8"]}))


@pytest.fixture(scope="module")
def voc():
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    return ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)


def tparams(**kw):
    return params(**{"attention": "trident", "vision": "d8", "beta": 1.4, **kw})


# --- transcriptions ---------------------------------------------------------------------------
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


# --- the refinement (seg_utils/utils.py 27-197) ---------------------------------------------
def split_connected_regions(segmentation, seg_logits, split_last=False, minimal_area=0,
                            coarse_thresh=0.0):
    from scipy import ndimage
    from torchvision.ops import masks_to_boxes

    C, H, W = segmentation.shape
    regions, boxes, clip_box_score, points = {}, {}, {}, {}
    for c in range(C):
        if not split_last and c == C - 1:
            continue
        regions[c], points[c], clip_box_score[c], boxes[c] = [], [], [], []
        class_mask = segmentation[c]
        class_logit = seg_logits[c]
        if class_logit.max() < coarse_thresh:
            continue
        labeled_mask, num_regions = ndimage.label(class_mask, structure=np.ones((3, 3)))
        for region_label in range(1, num_regions + 1):
            region_mask = (labeled_mask == region_label).astype(np.uint8)
            if region_mask.sum() < minimal_area:
                continue
            region_score = class_logit[region_mask.astype(bool)].mean()
            region_logit = class_logit * torch.tensor(region_mask).to(class_logit.device)
            max_pos = torch.argmax(region_logit)
            max_h, max_w = max_pos // class_logit.size(1), max_pos % class_logit.size(1)
            points[c].append(torch.tensor([max_w, max_h]))
            regions[c].append(region_mask)
            clip_box_score[c].append(region_score)
        if len(regions[c]):
            regions[c] = torch.from_numpy(np.stack(regions[c]))
        if isinstance(regions[c], list) and regions[c] == []:
            boxes[c] = regions[c]
        else:
            boxes[c] = masks_to_boxes(regions[c])
    return regions, boxes, clip_box_score, points


def _empty(x):
    return isinstance(x, list) and x == []


def map_refinement_coarse(refined_masks, refined_logits, coarse_boxes, seg_logits, img_shape):
    out = torch.zeros([len(coarse_boxes), img_shape[0], img_shape[1]])
    cumsum = 0
    for i in range(len(coarse_boxes)):
        if _empty(coarse_boxes[i]):
            continue
        n = coarse_boxes[i].shape[0]
        cls_mask = refined_masks[cumsum:cumsum + n, 0].sum(dim=0).bool()
        cls_logit = (refined_logits[cumsum:cumsum + n, 0] * seg_logits[i]).max(dim=0)
        out[i] = cls_logit.values * cls_mask
        cumsum += n
    return out.argmax(0, keepdim=True), out


def map_failed_regions(refined_masks, refined_logits, failed_regions, seg_logits,
                       segmentation):
    failed_area = failed_regions.sum(dim=0, keepdim=True) != 0
    failed_logit = failed_area * seg_logits
    refined_logits = torch.where(failed_logit > refined_logits, failed_logit, refined_logits)
    refined_masks = torch.where(failed_logit.max(dim=0, keepdim=True)[0]
                                > refined_logits.max(dim=0, keepdim=True)[0], segmentation,
                                refined_masks)
    return refined_masks, refined_logits


def sam_refinement_official(img, segmentations, seg_logits, num_classes, predictor,
                            coarse_thresh, minimal_area, sam_mask_coff, sam_iou_thresh):
    side = int(predictor.model.prompt_encoder.mask_input_size[0])            # Trident: 256
    down_ratio = 2
    dh, dw = seg_logits.shape[-2] // down_ratio, seg_logits.shape[-1] // down_ratio
    seg_down = F.interpolate(segmentations.unsqueeze(0).half(), [dh, dw],
                             mode="nearest").squeeze(0).long()
    logits_down = F.interpolate(seg_logits.unsqueeze(0), [dh, dw], mode="bilinear",
                                align_corners=False).squeeze(0)
    if coarse_thresh > 0:
        seg_down[logits_down.max(0, keepdim=True)[0] < coarse_thresh] = num_classes
        cls_pred = F.one_hot(seg_down.squeeze(0).long(), num_classes=num_classes + 1).permute(
            2, 0, 1).float()
        split_last = False
    else:
        cls_pred = F.one_hot(seg_down.squeeze(0).long(), num_classes=num_classes).permute(
            2, 0, 1).float()
        split_last = True
    regions, boxes, _, points = split_connected_regions(
        cls_pred.numpy(), logits_down, split_last=split_last, minimal_area=minimal_area,
        coarse_thresh=coarse_thresh)
    masks_l, scores_l, logits_l, failed = [], [], [], []
    for i in range(num_classes):
        tmp_r, tmp_b, tmp_p = regions.get(i, []), boxes.get(i, []), points.get(i, [])
        if _empty(tmp_r):
            continue
        r = logits_down[i].unsqueeze(0)
        new_h, new_w = predictor.transform.get_preprocess_shape(img.shape[0], img.shape[1],
                                                                side)
        r = F.interpolate(r.unsqueeze(0), [new_h, new_w], mode="bilinear",
                          align_corners=False).squeeze(0)
        r = F.pad(r, (0, side - new_w, 0, side - new_h), mode="constant", value=0)
        r = torch.where(r > coarse_thresh, sam_mask_coff * r,
                        torch.tensor(0.0).type_as(segmentations)).float()
        b = predictor.transform.apply_boxes_torch(tmp_b.type_as(segmentations), [dh, dw]).float()
        pts = torch.stack(tmp_p).type_as(segmentations)
        pts = predictor.transform.apply_coords_torch(pts, [dh, dw]).unsqueeze(1)
        m, s, lg = predictor.predict_torch(
            point_coords=pts.float(),
            point_labels=torch.ones([pts.shape[0], 1]).type_as(segmentations).float(),
            boxes=b, mask_input=r, multimask_output=False)
        valid = (s > sam_iou_thresh).squeeze(-1)
        if valid.sum() != tmp_r.shape[0]:
            failed.append(tmp_r[~valid])
        if valid.sum() == 0:
            boxes[i] = []
            continue
        masks_l.append(m[valid])
        scores_l.append(s[valid])
        logits_l.append(lg[valid])
        boxes[i] = boxes[i][valid]
    if not masks_l:
        return segmentations, seg_logits
    masks, logits = torch.cat(masks_l), torch.cat(logits_l)
    logits = predictor.model.postprocess_masks(logits, predictor.input_size,
                                               predictor.original_size)
    if logits.shape[-1] != img.shape[1] or logits.shape[-2] != img.shape[0]:
        logits = F.interpolate(logits, img.shape[:2], mode="bilinear", align_corners=False)
        masks = logits > predictor.model.mask_threshold
    refined_masks, refined_logits = map_refinement_coarse(masks, logits.sigmoid(), boxes,
                                                          seg_logits, img.shape)
    refined_masks = torch.where(refined_logits.sum(dim=0, keepdim=True) == 0, segmentations,
                                refined_masks)
    if failed:
        failed = torch.cat(failed)
        failed = F.interpolate(failed.unsqueeze(0).float(), img.shape[:2],
                               mode="nearest").squeeze(0).type_as(segmentations)
        refined_masks, refined_logits = map_failed_regions(refined_masks, refined_logits,
                                                           failed, seg_logits, segmentations)
    return refined_masks, refined_logits


# --- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["d8", "d4", "d7"])
def test_trident_equals_official(seg, voc, vision):
    img = image(45, 70)                       # 56 x 87 -> aligned 56 x 88, three windows
    ev = seg.extract(img, voc)
    for kw in ({"cos_fac": 2.0, "refine_neg_cos": False}, {"cos_fac": 0.6, "gamma": 5.0}):
        p = tparams(vision=vision, bg_threshold=0.05, **kw)
        want_probs, want, _, _ = trident_official(seg, img, p)
        assert (seg.decode_probs(ev, p) - want_probs).abs().max().item() < 1e-4
        got = seg.decode(ev, p)
        assert np.array_equal(got, want[0].numpy())
        assert len(np.unique(got)) > 2


def test_trident_cityscapes_halves_equal_official(seg_split, voc):
    img = image(45, 100)
    ev = seg_split.extract(img, voc)
    assert len(ev.meta["sam_parts"]) == 2
    p = tparams(cos_fac=0.8, bg_threshold=0.05)
    want_probs, want, _, _ = trident_official(seg_split, img, p, split=True)
    assert (seg_split.decode_probs(ev, p) - want_probs).abs().max().item() < 1e-4
    assert np.array_equal(seg_split.decode(ev, p), want[0].numpy())


@pytest.mark.parametrize("coarse,area,iou", [(0.2, 4, -1.0), (0.0, 0, -1.0), (0.3, 10, 0.0)])
def test_refinement_equals_official(seg, voc, coarse, area, iou):
    img = image(45, 70, seed=5)
    ev = seg.extract(img, voc)
    p = tparams(sam_refine=True, coarse_thresh=coarse, minimal_area=area, sam_iou_thresh=iou,
                sam_mask_coff=0.5, bg_threshold=0.05)
    probs, pred, predictor, num_cls = trident_official(seg, img, p)
    want, _ = sam_refinement_official(img, pred, probs, num_cls, predictor, coarse, area,
                                      0.5, iou)
    want = want[0].numpy()
    # the same CLIP labels and probabilities in: the same labels out, bit for bit (SAM's prompt
    # encoder and mask decoder from the decode head, the embedding from the evidence)
    from methods.clipseg.sam_refine import sam_refinement

    ours = sam_refinement(pred[0], probs.detach(), seg.refine_sam(), ev.tensors["sam.embedding"],
                          ev.meta["sam_input_size"], ev.meta["sam_original_size"], p)
    assert np.array_equal(ours.numpy(), want)
    # end to end: decode's probabilities differ from the transcription's by ~1e-6, which can
    # move a pixel of a SAM mask boundary (logit ~ 0)
    got = seg.decode(ev, p)
    assert (got == want).mean() >= 0.995
    plain = seg.decode(ev, {**p, "sam_refine": False})
    assert np.array_equal(plain, pred[0].numpy())
    if iou < 0:                               # every mask kept: the refinement changes labels
        assert (got != plain).mean() > 0.01


def test_failed_regions_never_change_the_label_map(seg, voc):
    """Masks below sam_iou_thresh: Trident's map_failed_regions changes only its probabilities
    (the official code keeps them, ours leaves them out; the labels agree above)."""
    img = image(45, 70, seed=5)
    p = tparams(sam_refine=True, coarse_thresh=0.2, minimal_area=4, sam_mask_coff=0.5,
                bg_threshold=0.05)
    probs, pred, predictor, num_cls = trident_official(seg, img, p)
    from segment_anything import SamPredictor  # noqa: F401

    ious = []
    orig = predictor.predict_torch

    def spy(*a, **k):
        out = orig(*a, **k)
        ious.extend(out[1][:, 0].tolist())
        return out

    predictor.predict_torch = spy
    sam_refinement_official(img, pred, probs, num_cls, predictor, 0.2, 4, 0.5, -1.0)
    thresh = float(np.median(ious))           # about half of the masks fail
    want, _ = sam_refinement_official(img, pred, probs, num_cls, predictor, 0.2, 4, 0.5,
                                      thresh)
    ev = seg.extract(img, voc)
    from methods.clipseg.sam_refine import sam_refinement

    ours = sam_refinement(pred[0], probs.detach(), seg.refine_sam(), ev.tensors["sam.embedding"],
                          ev.meta["sam_input_size"], ev.meta["sam_original_size"],
                          {**p, "sam_iou_thresh": thresh})
    assert np.array_equal(ours.numpy(), want[0].numpy())
    assert 0.2 < np.mean(np.array(ious) > thresh) < 0.8


def test_every_trident_knob_changes_the_output(seg, voc):
    img = image(45, 70, seed=5)
    ev = seg.extract(img, voc)
    base = seg.decode_probs(ev, tparams(beta=1.0))
    for kw in ({"beta": 0.8}, {"gamma": 6.0}, {"cos_fac": 0.2}, {"vision": "d4"},
               {"logit_scale": 70.0}):
        assert (seg.decode_probs(ev, tparams(**{"beta": 1.0, **kw})) - base).abs().max() > 1e-3, kw
    neg = tparams(cos_fac=-2.0)
    assert (seg.decode_probs(ev, neg) - seg.decode_probs(ev, {**neg, "refine_neg_cos": False})
            ).abs().max() > 1e-3
    ref = tparams(sam_refine=True, coarse_thresh=0.1, minimal_area=4, sam_iou_thresh=-1.0,
                  bg_threshold=0.05)
    a = seg.decode(ev, ref)
    for kw in ({"coarse_thresh": 0.3}, {"minimal_area": 60}, {"sam_iou_thresh": 5.0}):
        assert (seg.decode(ev, {**ref, **kw}) != a).any(), kw


def test_trident_needs_sam_and_the_patch_grid():
    from methods.clipseg.second import check_plan

    st = {**SETTINGS, "pad_to": None}
    space = {"attention": {"type": "categorical", "choices": ["trident"]}}
    check_plan(TINY_CLIP, st, {"attention": "trident"}, space)
    with pytest.raises(OvssError, match="settings.sam"):
        check_plan(TINY_CLIP, {**st, "sam": None}, {}, space)
    with pytest.raises(OvssError, match="multiples"):
        check_plan(TINY_CLIP, {**st, "window": 60, "vision": ["d8"]}, {}, space)
    with pytest.raises(OvssError, match="align"):
        check_plan(TINY_CLIP, {**st, "align": None}, {}, space)


@pytest.mark.parametrize("size", [(56, 87), (40, 61), (64, 64), (33, 100), (57, 57)])
def test_aligned_size_is_preprocess_image(size):
    from methods.clipseg.trident import aligned_size

    x = torch.zeros(1, 3, *size)
    assert aligned_size(*size, 8, 56) == tuple(preprocess_image(x, 8, 56).shape[-2:])


# --- a search over cra, proxyclip and trident, its export, inference of each exported variant
@pytest.mark.slow
def test_smoke_second_search_samples_the_new_variants_exports_and_infers(ray_session, workdir):
    import yaml
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from methods.infer import main as infer_main
    from search.export import main as export_main
    from search.run import main as run_main

    assert run_main(["--method", "clipseg", "--preset", "smoke_second",
                     "--num-samples", "16"]) == 0
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = [e for e in client.search_experiments() if e.name.startswith("clipseg/")][0]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    assert len(trials) >= 16 and {t.info.status for t in trials} == {"FINISHED"}
    sampled = {t.data.params.get("attention") for t in trials}
    visions = {t.data.params.get("vision") for t in trials
               if t.data.params.get("attention") != "cra"}
    assert {"proxyclip", "trident"} <= sampled, sampled
    assert visions == {"tiny-dino", "tiny-dinov2-reg"}, visions
    out = workdir / "tuned.yaml"
    assert export_main(["--method", "clipseg", "--tracking-uri", uri, "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["settings"]["vision"] == ["tiny-dino", "tiny-dinov2-reg"]
    image = sorted((workdir / ".ovss" / "smoke" / "voc21" / "JPEGImages").iterdir())[0]
    for variant, refine in (("proxyclip", False), ("trident", False), ("trident", True)):
        one = workdir / f"tuned-{variant}-{refine}.yaml"
        one.write_text(yaml.safe_dump({**cfg, "params": {
            **cfg["params"], "attention": variant, "sam_refine": refine,
            "sam_iou_thresh": 0.0}}))
        png = workdir / f"pred-{variant}-{refine}.png"
        assert infer_main(["--config", str(one), "--image", str(image), "--classes",
                           "cat,dog,person", "--out", str(png)]) == 0
        pred = np.array(Image.open(png))
        assert pred.shape == Image.open(image).size[::-1] and pred.max() <= 3
