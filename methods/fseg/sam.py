"""SAM through segment-anything: sizes as data, checkpoints read with ``weights_only=True``.

``SAM_SIZES`` mirrors segment-anything's ``build_sam.py`` (vit_h / vit_l / vit_b) plus ``tiny``
(a 128 px, 2-block encoder with 32-d prompts for tests; random weights seeded by the caller).
A backbone entry gives ``sam: vit_h`` and ``sam_checkpoint: /path/sam_vit_h_4b8939.pth``
(relative paths are taken from the working directory). Without a checkpoint, ``sam: tiny`` or
``sam_random: true`` (any size: the real architecture with random weights, for benchmarks) build
random weights seeded by ``settings.seed``; otherwise a missing file is an OvssError.

The image embedding is computed once per image (``SamPredictor.set_image``, the expensive ViT)
and cached in the evidence; decode puts it back into a ``SamPredictor`` (``features``,
``original_size``, ``input_size``, ``is_image_set``) and calls ``predict``, which runs only the
prompt encoder and the mask decoder.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.base import OvssError

SAM_SIZES: dict[str, dict[str, Any]] = {
    "vit_h": {"embed_dim": 1280, "depth": 32, "heads": 16, "global_attn": (7, 15, 23, 31)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "heads": 16, "global_attn": (5, 11, 17, 23)},
    "vit_b": {"embed_dim": 768, "depth": 12, "heads": 12, "global_attn": (2, 5, 8, 11)},
    "tiny": {"embed_dim": 32, "depth": 2, "heads": 2, "global_attn": (1,), "image_size": 128,
             "prompt_dim": 32, "window": 4, "decoder_depth": 1, "decoder_mlp": 64,
             "decoder_heads": 2, "mask_in_chans": 4},
}


def build_sam(embed_dim: int, depth: int, heads: int, global_attn: tuple[int, ...],
              image_size: int = 1024, prompt_dim: int = 256, window: int = 14,
              decoder_depth: int = 2, decoder_mlp: int = 2048, decoder_heads: int = 8,
              mask_in_chans: int = 16) -> torch.nn.Module:
    """The segment-anything ``Sam`` with every size a plain argument (random weights, eval)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn,
            window_size=window, out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size),
                                     mask_in_chans=mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim,
                                          mlp_dim=decoder_mlp, num_heads=decoder_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def load_sam(backbone: Mapping[str, Any], seed: int, device: str) -> torch.nn.Module:
    """The SAM of a backbone entry: ``sam`` size + ``sam_checkpoint`` (``tiny``: random)."""
    size = backbone.get("sam", "vit_h")
    if size not in SAM_SIZES:
        raise OvssError(f"fseg backbone {backbone.get('name')!r}: sam must be one of "
                        f"{sorted(SAM_SIZES)}, got {size!r}")
    ckpt = backbone.get("sam_checkpoint")
    if not ckpt and (size == "tiny" or backbone.get("sam_random")):
        torch.manual_seed(seed)
        return build_sam(**SAM_SIZES[size]).to(device)
    if not ckpt or not Path(ckpt).is_file():
        raise OvssError(f"fseg: SAM checkpoint {ckpt!r} not found (download sam_{size}_*.pth and "
                        f"give --set backbone.sam_checkpoint=PATH)")
    sam = build_sam(**SAM_SIZES[size])
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise OvssError(f"fseg: cannot load SAM checkpoint {ckpt!r} as {size} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return sam.to(device)


def image_embedding(predictor: Any, image: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """Run SAM's image encoder once: (1 x C x h x w embedding, [input_h, input_w])."""
    predictor.set_image(image)
    return predictor.features.detach(), [int(v) for v in predictor.input_size]


def predict_from_embedding(predictor: Any, embedding: torch.Tensor, input_size: list[int],
                           original_size: tuple[int, int], points: np.ndarray | None,
                           box: np.ndarray | None, multimask: bool) -> tuple[np.ndarray, float]:
    """SAM's prompt encoder + mask decoder on a cached embedding: (H x W bool mask, its
    predicted IoU). ``points``: P x 2 (x, y) pixels, all positive; ``box``: [x0, y0, x1, y1]."""
    device = next(predictor.model.parameters()).device
    predictor.features = embedding.to(device=device, dtype=torch.float32)
    predictor.input_size = tuple(input_size)
    predictor.original_size = tuple(original_size)
    predictor.is_image_set = True
    return sam_predict(predictor, points, box, multimask)


def sam_predict(predictor: Any, points: np.ndarray | None, box: np.ndarray | None,
                multimask: bool) -> tuple[np.ndarray, float]:
    """``predictor.predict`` with positive points and/or a box; with ``multimask`` the mask of
    highest predicted IoU is kept."""
    labels = None if points is None else np.ones(len(points), dtype=np.int64)
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                         multimask_output=multimask)
    best = int(np.argmax(scores)) if multimask else 0
    return masks[best].astype(bool), float(scores[best])
