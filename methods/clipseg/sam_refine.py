"""Trident's SAM refinement (YuHengsss/Trident ``seg_utils/utils.py`` 27-197, called from
``trident.py`` 277-283 with ``--sam_refine``): CLIP's label map turned into SAM prompts, SAM's
masks turned back into labels. Decode runs SAM's prompt encoder and mask decoder on the cached
image embedding, never its image encoder.

At half the image size (labels nearest, class probabilities bilinear):

1. pixels whose best class probability is below ``coarse_thresh`` get a dummy class (only
   when ``coarse_thresh`` > 0);
2. for every class whose probability reaches ``coarse_thresh`` somewhere, each 8-connected
   region of its label mask with at least ``minimal_area`` pixels gives a box (its bounding
   box), a positive point (its class-probability maximum) and, shared by the class's regions, a
   mask prompt: the class-probability map (long side 256, zero-padded to 256 x 256: SAM's mask
   input size, 4 x its embedding grid; a tiny SAM's is smaller) times ``sam_mask_coff`` where
   above ``coarse_thresh``, else 0 (a 1 x 256 x 256 tensor, passed unbatched as Trident does);
3. SAM predicts one mask per region; masks whose predicted IoU exceeds ``sam_iou_thresh`` are
   kept;
4. per class, the maximum over its kept masks of sigmoid(SAM logit) x class probability, inside
   the union of its masks; the label is the argmax over classes where any mask covers the pixel,
   CLIP's label elsewhere.

Regions whose masks fail step 3 change only Trident's returned probabilities, never its label
map: after ``refined = max(failed, refined)`` (``map_failed_regions``, 85-90) the test
``max_c failed > max_c refined`` is false everywhere. They are left out here (the tests check
the label map against a transcription that keeps them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Evidence
from methods.clipseg.labels import labels_from_probs


class _EncoderStub(nn.Module):
    """Stands in for SAM's image encoder in decode: only its input size is read."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size


def decode_sam(head: Evidence) -> nn.Module:
    """segment-anything's ``Sam`` with the prompt encoder and mask decoder of the decode head
    (``sam.pe.*``, ``sam.md.*``) and no image encoder (eval, float32, CPU)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from methods.fseg.sam import SAM_SIZES

    size = {"image_size": 1024, "prompt_dim": 256, "decoder_depth": 2, "decoder_mlp": 2048,
            "decoder_heads": 8, "mask_in_chans": 16, **SAM_SIZES[str(head.meta["sam_size"])]}
    img = int(head.meta["sam_img_size"])
    grid, dim = img // 16, size["prompt_dim"]
    sam = Sam(image_encoder=_EncoderStub(img),
              prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                           input_image_size=(img, img),
                                           mask_in_chans=size["mask_in_chans"]),
              mask_decoder=MaskDecoder(
                  num_multimask_outputs=3,
                  transformer=TwoWayTransformer(depth=size["decoder_depth"], embedding_dim=dim,
                                                mlp_dim=size["decoder_mlp"],
                                                num_heads=size["decoder_heads"]),
                  transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    for prefix, mod in (("sam.pe.", sam.prompt_encoder), ("sam.md.", sam.mask_decoder)):
        mod.load_state_dict({k[len(prefix):]: v for k, v in head.tensors.items()
                             if k.startswith(prefix)})
    return sam.eval()


def region_prompts(labels: torch.Tensor, probs: torch.Tensor, coarse_thresh: float,
                   minimal_area: int) -> dict[int, tuple[list[np.ndarray], list[list[int]]]]:
    """Steps 1-2 at half size: class -> (region masks dh x dw bool, points [x, y])."""
    from scipy import ndimage

    c = probs.shape[0]
    labels = labels.clone()
    if coarse_thresh > 0:
        labels[probs.amax(0) < coarse_thresh] = c          # the dummy class, never prompted
    out = {}
    struct = np.ones((3, 3), dtype=bool)                   # 8-connectivity
    lab_np = labels.numpy()
    for k in range(c):
        if float(probs[k].max()) < coarse_thresh:
            continue
        comp, n = ndimage.label(lab_np == k, structure=struct)
        masks, points = [], []
        for r in range(1, n + 1):
            m = comp == r
            if m.sum() < minimal_area:
                continue
            score = probs[k] * torch.from_numpy(m)
            pos = int(torch.argmax(score))
            points.append([pos % probs.shape[2], pos // probs.shape[2]])
            masks.append(m)
        if masks:
            out[k] = (masks, points)
    return out


def boxes_of(masks: list[np.ndarray]) -> torch.Tensor:
    """K x 4 (x0, y0, x1, y1) inclusive bounding boxes (torchvision ``masks_to_boxes``)."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def sam_refinement(labels: torch.Tensor, probs: torch.Tensor, sam: nn.Module,
                   embedding: torch.Tensor, input_size: tuple[int, int],
                   original_size: tuple[int, int], params: Mapping[str, Any]) -> torch.Tensor:
    """The refinement (module docstring). labels: H x W int64; probs: C x H x W float32 (class
    index = label value); embedding: 1 x C' x g x g; input_size / original_size: SAM's
    ``set_image`` sizes. Returns H x W int64."""
    from segment_anything.utils.transforms import ResizeLongestSide

    coarse = float(params["coarse_thresh"])
    h, w = probs.shape[-2:]
    dh, dw = h // 2, w // 2
    lab_d = F.interpolate(labels[None, None].float(), [dh, dw], mode="nearest")[0, 0].long()
    prob_d = F.interpolate(probs[None], [dh, dw], mode="bilinear", align_corners=False)[0]
    prompts = region_prompts(lab_d, prob_d, coarse, int(params["minimal_area"]))
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    emb = embedding.float()
    refined = torch.zeros(probs.shape)
    side = int(pe.mask_input_size[0])                  # 256 for SAM (4 x its 64 x 64 grid)
    nh, nw = transform.get_preprocess_shape(h, w, side)
    for k, (masks, points) in prompts.items():
        r = F.interpolate(prob_d[k][None, None], [nh, nw], mode="bilinear",
                          align_corners=False)[0]
        r = F.pad(r, (0, side - nw, 0, side - nh))
        r = torch.where(r > coarse, float(params["sam_mask_coff"]) * r, torch.zeros(()))
        boxes = transform.apply_boxes_torch(boxes_of(masks), [dh, dw])
        pts = transform.apply_coords_torch(torch.tensor(points, dtype=torch.float32),
                                           [dh, dw])[:, None]
        sparse, dense = pe(points=(pts, torch.ones(len(points), 1)), boxes=boxes, masks=r)
        low, iou = dec(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                       multimask_output=False)
        keep = iou[:, 0] > float(params["sam_iou_thresh"])
        if not bool(keep.any()):
            continue
        logits = sam.postprocess_masks(low[keep], tuple(input_size), tuple(original_size))
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)
        union = (logits[:, 0] > sam.mask_threshold).any(0)
        refined[k] = (logits[:, 0].sigmoid() * probs[k]).amax(0) * union
    best = refined.argmax(0)
    return torch.where(refined.sum(0) == 0, labels, best)


def refined_labels(seg: Any, ev: Evidence, params: Mapping[str, Any], mode: str,
                   area: float | None) -> np.ndarray:
    """Trident's label map with the SAM refinement: H x W int64."""
    probs = seg.decode_probs(ev, params)
    labels = torch.from_numpy(labels_from_probs(probs, mode, seg.threshold(params), area))
    if mode == "threshold":                     # no background channel: give it probability 0
        probs = torch.cat([torch.zeros_like(probs[:1]), probs])
    meta = ev.meta
    sam = seg.refine_sam()
    out = sam_refinement(labels, probs, sam, ev.tensors["sam.embedding"],
                         tuple(meta["sam_input_size"]), tuple(meta["sam_original_size"]), params)
    return out.numpy().astype(np.int64)
