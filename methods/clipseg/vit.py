"""One pass of open_clip's ViT over a batch of windows, keeping what decode needs.

The walk is the family's own loop (as ClearCLIP / SCLIP / NACLIP write it), not hooks: embed
with an interpolated positional embedding, then for every block compute ``ln_1(x)`` and the
packed q/k/v projection once, keep the keys' Gram matrix, finish the block with the same
operations as open_clip's ``ResidualAttentionBlock`` (tested equal), and for the final block
keep only what the reformed block (Eq. 2) uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.clipseg.formulas import (
    deep_layer_output,
    deep_value,
    key_gram,
)
from methods.clipseg.windows import interpolate_pos_embed


@dataclass
class WindowEvidence:
    """Per-window tensors of one ViT pass over B windows of T = 1 + P tokens.

    grams:  (L - 1) x B x T x T float32, key_gram of blocks 1..L-1 (index M - 1 for layer M).
    x:      B x T x D, the final block's input x_{L-1}.
    q, k:   B x T x D, the final block's queries and keys (heads concatenated).
    terms:  K x B x T x D, [v_L, v~_{L-1}, ..., v~_{L-K+1}], raw (before out_proj).
    stream: (L - 1) x B x T x D, the residual stream after blocks 1..L-1 (X_0..X_{L-2}; the
            last is ``x``), or None when not asked for.
    """

    grams: torch.Tensor
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    terms: torch.Tensor
    stream: torch.Tensor | None = None


def embed_windows(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer._embeds`` with the positional embedding resized to the
    window's patch grid. pixels: B x 3 x ph x pw (normalised). Returns B x T x D."""
    x = visual.conv1(pixels)                                            # B x D x gh x gw
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), grid)
    x = x + pos.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def split_qkv(block: nn.Module, x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (each B x T x D, heads concatenated) of a block from its input x (B x T x D)."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def finish_block(block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """The rest of ``ResidualAttentionBlock.forward`` given q/k/v: multi-head attention,
    out_proj, residual, then the FFN with its residual. Returns B x T x D."""
    b, t, dim = x.shape
    h = block.attn.num_heads

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.view(b, t, h, dim // h).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    o = block.attn.out_proj(o.transpose(1, 2).reshape(b, t, dim))
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def window_pass(visual: nn.Module, pixels: torch.Tensor, dsi_terms: int,
                keep_stream: bool = False) -> WindowEvidence:
    """Run the ViT once over windows (B x 3 x ph x pw) and collect :class:`WindowEvidence`.

    ``dsi_terms`` = K: v_L plus the regenerated values of the K - 1 blocks before the last.
    ``keep_stream``: also keep every block's output but the last (SC-CLIP's ``feats_list``).
    """
    blocks = visual.transformer.resblocks
    n = len(blocks)
    x = embed_windows(visual, pixels)
    grams, inputs, stream = [], {}, []
    for i, block in enumerate(blocks):
        q, k, v = split_qkv(block, x)
        if i == n - 1:
            break
        grams.append(key_gram(k))
        if i >= n - dsi_terms:
            inputs[i] = x                                               # input of block i + 1
        x = finish_block(block, x, q, k, v)
        if keep_stream:
            stream.append(x)
    final = blocks[-1]
    terms = [v] + [deep_value(deep_layer_output(inputs[i], blocks[i]), final)
                   for i in range(n - 2, n - 1 - dsi_terms, -1)]
    return WindowEvidence(torch.stack(grams), x, q, k, torch.stack(terms).float(),
                          torch.stack(stream) if keep_stream else None)
