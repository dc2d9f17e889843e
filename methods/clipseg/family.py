"""The final blocks of the training-free CLIP family, per head, as their official code computes
them (file and line of each source in docs/clipseg.md).

Notation as in formulas.py: a window has T = 1 + P tokens, width D, H heads of d = D / H.
``x`` is the final block's input x_{L-1} (B x T x D), q / k / v its projections of
``ln_1(x)`` (B x T x D, heads concatenated). Every attention here is **per head**: head h's
T x T map multiplies head h's values, the heads are concatenated, then ``out_proj`` (with
bias). What each variant keeps of the block:

=============  ===========================================  ===================  ========
variant        attention of head h                          residual x_{L-1}     FFN
=============  ===========================================  ===================  ========
``qk``         softmax(q_h k_h^T / sqrt d) (CLIP's own)     no (reformed block)  no
``clearclip``  softmax(q_h q_h^T / sqrt d)                  no                   no
``sclip``      softmax(q_h q_h^T/sqrt d) + softmax(k_h k_h^T/sqrt d) (rows sum 2)  yes   yes
``naclip``     softmax(k_h k_h^T / sqrt d + omega), omega  no                   no
               a 2-D Gaussian over the patch grid (std)
``maskclip``   identity (each token its own value)          yes                  yes
=============  ===========================================  ===================  ========

The block output then goes through ``ln_post`` and ``proj`` like CLIP's class token.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def split_heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    """B x T x D -> B x H x T x d."""
    b, t, dim = z.shape
    return z.view(b, t, heads, dim // heads).transpose(1, 2)


def merge_heads(z: torch.Tensor) -> torch.Tensor:
    """B x H x N x d -> B x N x D (heads concatenated in order)."""
    b, h, n, d = z.shape
    return z.transpose(1, 2).reshape(b, n, h * d)


def self_attention(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head softmax(a_h b_h^T / sqrt d): B x T x D twice -> B x H x T x T float32."""
    ah, bh = split_heads(a.float(), heads), split_heads(b.float(), heads)
    d = ah.shape[-1]
    return torch.softmax(ah @ bh.transpose(-1, -2) * d ** -0.5, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor, out_proj: nn.Linear) -> torch.Tensor:
    """Per-head mixing then ``out_proj``: probs B x H x N x T, v B x T x D -> B x N x D."""
    o = merge_heads(probs @ split_heads(v.float(), probs.shape[1]))
    return nn.functional.linear(o, out_proj.weight.float(), out_proj.bias.float()
                                if out_proj.bias is not None else None)


def ffn_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + FFN(ln_2(x))`` of the block (open_clip's second half of a block)."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def fixed_outputs(block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The knob-free final blocks (clearclip, sclip, maskclip): name -> B x T x D float32.

    block: the final open_clip ResidualAttentionBlock; x: its input; q, k, v: its projections.
    """
    heads = block.attn.num_heads
    op = block.attn.out_proj
    clear = attend(self_attention(q, q, heads), v, op)
    csa = self_attention(q, q, heads) + self_attention(k, k, heads)
    sclip = ffn_residual(block, x.float() + attend(csa, v, op))
    value = nn.functional.linear(v.float(), op.weight.float(),
                                 op.bias.float() if op.bias is not None else None)
    maskclip = ffn_residual(block, x.float() + value)
    return {"clearclip": clear, "sclip": sclip, "maskclip": maskclip}


@functools.lru_cache(maxsize=16)
def neighbourhood_bias(gh: int, gw: int, std: float) -> torch.Tensor:
    """NACLIP's omega over a gh x gw patch grid: P x P float32 (P = gh gw),
    ``exp(-((y_i - y_j)^2 + (x_i - x_j)^2) / (2 std^2))`` for patches i, j (row-major).
    The class token's row and column are zero in NACLIP; callers pad them."""
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32),
                            torch.arange(gw, dtype=torch.float32), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dist2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    return torch.exp(-dist2 / (2.0 * float(std) ** 2))


def naclip_probs(k: torch.Tensor, heads: int, grid: tuple[int, int], std: float
                 ) -> torch.Tensor:
    """NACLIP's attention for the patch rows: softmax(k_h k_h^T / sqrt d + omega) per head.

    k: B x T x D (final block keys). Returns B x H x P x T float32.
    """
    kh = split_heads(k.float(), heads)
    d = kh.shape[-1]
    logits = kh[:, :, 1:] @ kh.transpose(-1, -2) * d ** -0.5          # B x H x P x T
    omega = neighbourhood_bias(int(grid[0]), int(grid[1]), float(std))
    logits[..., 1:] += omega                                             # class column: 0
    return torch.softmax(logits, dim=-1)
