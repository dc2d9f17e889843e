"""A direct transcription of Trident's SAM refinement (YuHengsss/Trident a93b346
``seg_utils/utils.py`` 27-197). Where a tiny SAM forces it: its mask input size (the literal 256
is 4 x SAM's 64 x 64 grid). ``skimage.measure.label(connectivity=2)`` is ``scipy.ndimage.label``
with a 3 x 3 structure (both label 8-connected components; scikit-image is not a dependency).
Used by tests/test_clipseg_trident.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


