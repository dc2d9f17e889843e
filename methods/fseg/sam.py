"""SAM through segment-anything: sizes as data, checkpoints read with ``weights_only=True``.

``SAM_SIZES`` mirrors segment-anything's ``build_sam.py`` (vit_h / vit_l / vit_b) plus ``tiny``
(a 128 px, 2-block encoder with 32-d prompts for tests; random weights seeded by the caller).
A backbone entry gives ``sam: vit_h`` and ``sam_checkpoint: /path/sam_vit_h_4b8939.pth``
(relative paths are taken from the working directory). Without a checkpoint, ``sam: tiny`` or
``sam_random: true`` (any size: the real architecture with random weights, for benchmarks) build
random weights seeded by ``settings.seed``; otherwise a missing file is an OvssError.

The image embedding is computed once per image (``SamPredictor.set_image``, the expensive ViT)
and cached in the evidence. Decode runs only the prompt encoder and the mask decoder, through
``EmbeddingDecoder``: segment-anything's own modules, called in the same order as
``SamPredictor.predict``, with the image-side tensors that no prompt changes computed once per
embedding (the dense no-mask embedding added to the image embedding, the dense positional
encoding, and in the first two-way block the token-to-image keys / values and the
image-to-token queries, which see the image embedding before any prompt has touched it), and
with only the returned mask (the best of three under ``multimask``) upsampled to the image.
Its masks and scores equal ``SamPredictor.predict``'s (tested bit for bit).
"""

from __future__ import annotations

import math
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


def _attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
            ) -> torch.Tensor:
    """segment-anything's ``transformer.Attention.forward`` after its input projections."""
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    a = q @ k.permute(0, 1, 3, 2)
    a = a / math.sqrt(q.shape[-1])
    a = torch.softmax(a, dim=-1)
    return attn.out_proj(attn._recombine_heads(a @ v))


class EmbeddingDecoder:
    """SAM's prompt encoder + mask decoder on one cached image embedding (see the module
    docstring); ``__call__`` matches ``SamPredictor.predict`` with positive points / a box."""

    def __init__(self, predictor: Any, embedding: torch.Tensor, input_size: list[int],
                 original_size: tuple[int, int]):
        sam = predictor.model
        self.predictor, self.sam = predictor, sam
        self.input_size, self.original_size = tuple(input_size), tuple(original_size)
        device = next(sam.parameters()).device
        pe = sam.prompt_encoder
        with torch.no_grad():
            emb = embedding.to(device=device, dtype=torch.float32)
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, pe.image_embedding_size[0], pe.image_embedding_size[1])
            src = torch.repeat_interleave(emb, 1, dim=0) + dense
            self.shape = src.shape
            self.keys = src.flatten(2).permute(0, 2, 1)
            self.key_pe = pe.get_dense_pe().flatten(2).permute(0, 2, 1)
            first = sam.mask_decoder.transformer.layers[0]
            k_in = self.keys + self.key_pe
            self.t2i_k = first.cross_attn_token_to_image.k_proj(k_in)
            self.t2i_v = first.cross_attn_token_to_image.v_proj(self.keys)
            self.i2t_q = first.cross_attn_image_to_token.q_proj(k_in)

    def _first_block(self, layer: Any, queries: torch.Tensor, query_pe: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
        t2i = layer.cross_attn_token_to_image
        queries = layer.norm2(queries + _attend(t2i, t2i.q_proj(queries + query_pe),
                                                self.t2i_k, self.t2i_v))
        queries = layer.norm3(queries + layer.mlp(queries))
        i2t = layer.cross_attn_image_to_token
        q = queries + query_pe
        keys = layer.norm4(self.keys + _attend(i2t, self.i2t_q, i2t.k_proj(q),
                                               i2t.v_proj(queries)))
        return queries, keys

    @torch.no_grad()
    def __call__(self, points: np.ndarray | None, box: np.ndarray | None,
                 multimask: bool) -> tuple[np.ndarray, float]:
        sam, tf = self.sam, self.predictor.transform
        device = self.keys.device
        pts = None
        if points is not None:
            coords = torch.as_tensor(tf.apply_coords(points, self.original_size),
                                     dtype=torch.float, device=device)[None]
            labels = torch.ones((1, len(points)), dtype=torch.int, device=device)
            pts = (coords, labels)
        boxes = None
        if box is not None:
            boxes = torch.as_tensor(tf.apply_boxes(box, self.original_size),
                                    dtype=torch.float, device=device)
        sparse, _ = sam.prompt_encoder(points=pts, boxes=boxes, masks=None)
        dec = sam.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        tr = dec.transformer
        queries, keys = self._first_block(tr.layers[0], tokens, tokens)
        for layer in tr.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens,
                                  key_pe=self.key_pe)
        attn_out = tr.final_attn_token_to_image(q=queries + tokens, k=keys + self.key_pe,
                                                v=keys)
        hs = tr.norm_final_attn(queries + attn_out)
        b, c, h, w = self.shape
        up = dec.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i, :])
                             for i in range(dec.num_mask_tokens)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
        iou = dec.iou_prediction_head(hs[:, 0, :])
        keep = slice(1, None) if multimask else slice(0, 1)
        masks, iou = masks[:, keep], iou[:, keep]
        best = int(np.argmax(iou[0].cpu().numpy())) if multimask else 0
        full = sam.postprocess_masks(masks[:, best:best + 1], self.input_size, self.original_size)
        return (full[0, 0] > sam.mask_threshold).cpu().numpy(), float(iou[0, best])


def sam_predict(predictor: Any, points: np.ndarray | None, box: np.ndarray | None,
                multimask: bool) -> tuple[np.ndarray, float]:
    """``predictor.predict`` with positive points and/or a box; with ``multimask`` the mask of
    highest predicted IoU is kept."""
    labels = None if points is None else np.ones(len(points), dtype=np.int64)
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                         multimask_output=multimask)
    best = int(np.argmax(scores)) if multimask else 0
    return masks[best].astype(bool), float(scores[best])
