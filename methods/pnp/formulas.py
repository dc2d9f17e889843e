"""PnP-OVSS steps 2-4, one function per term of the paper (Luo et al., CVPR 2024,
"Emergent Open-Vocabulary Semantic Segmentation from Off-the-shelf Vision-Language Models").

Shapes: T text tokens, P x P image patches (the image CLS key is dropped: ``N = P²`` columns),
H heads, K classes. All float tensors are float32 unless stated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DROP_RULES = ("top_k", "halving", "above")


def gradcam_attention(attention: torch.Tensor, gradient: torch.Tensor,
                      text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3, GradCAM weighting of the cross-attention: ``G = A ⊙ max(∂s/∂A, 0)``.

    attention, gradient: ``[..., T, 1 + N]`` (post-softmax text-to-image attention and the
    gradient of the ITM match logit s with respect to it); text_mask: ``[T]`` (1 = real token).
    Returns ``[..., T, N]``: the image CLS column removed, padded text rows zeroed, ``>= 0``.
    """
    g = attention[..., 1:] * gradient[..., 1:].clamp(min=0)
    if text_mask is not None:
        g = g * text_mask.to(g.dtype)[:, None]
    return g.clamp(min=0)


def class_salience(gradcam: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Step 2, the salience map of each class: the mean of its word pieces' rows of G.

    gradcam: ``[..., T, N]``; groups[k]: the token rows of class k. Returns ``[..., K, N]``.
    """
    return torch.stack([gradcam[..., list(rows), :].mean(-2) for rows in groups], -2)


def aggregated_salience(gradcam: torch.Tensor, class_rows: Sequence[int],
                        dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4, the class-agnostic salience U^(t) that Salience DropOut ranks patches by: the sum
    of G over every class token row, zero at the already-dropped patches.

    gradcam: ``[..., T, N]``; dropped: ``[N]`` bool. Returns ``[..., N]``.
    """
    u = gradcam[..., list(class_rows), :].sum(-2)
    if dropped is not None:
        u = u.masked_fill(dropped, 0.0)
    return u


def salience_dropout_selection(salience: torch.Tensor, dropped: torch.Tensor, rule: str,
                               iteration: int, k: int = 10,
                               threshold: float = 0.5) -> torch.Tensor:
    """Step 4, the patches blacked out after drop iteration t: ``S^(t) = S^(t-1) minus
    {(i, j) | U_ij^(t) in A}``, A chosen by ``rule`` among the patches still in S^(t-1):

    - ``top_k``: the k highest U (the reference code: k = 10 per iteration);
    - ``halving``: the ``floor(N / 2^(t+1))`` highest (the reference's first release);
    - ``above``: those with min-max normalised U (over the remaining patches) ``>= threshold``.

    salience: ``[N]``; dropped: ``[N]`` bool (the complement of S^(t-1)); iteration: t, 0-based.
    Ties are broken by the lower patch index (a stable sort). Returns the new ``[N]`` bool mask
    of dropped patches (the old ones included).
    """
    if rule not in DROP_RULES:
        raise ValueError(f"unknown drop rule {rule!r}; choose one of {DROP_RULES}")
    remaining = int((~dropped).sum())
    if remaining == 0:
        return dropped.clone()
    if rule == "above":
        u = salience[~dropped]
        lo, hi = u.min(), u.max()
        norm = (salience - lo) / (hi - lo) if hi > lo else torch.ones_like(salience)
        return dropped | ((norm >= threshold) & ~dropped)
    n = k if rule == "top_k" else salience.numel() // 2 ** (iteration + 1)
    n = min(max(int(n), 0), remaining)
    order = torch.sort(salience.masked_fill(dropped, float("-inf")), descending=True,
                       stable=True).indices
    out = dropped.clone()
    out[order[:n]] = True
    return out


def drop_patches(pixels: torch.Tensor, dropped: torch.Tensor, patch: int,
                 fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Step 4, black out the dropped patches of the (normalised) image.

    pixels: ``[B, 3, S, S]``; dropped: ``[P*P]`` bool, row-major over the P x P grid; fill:
    the normalised value put in (0 = the mean colour, as the reference code; ``-mean/std`` =
    black) as a float or a ``[3]`` tensor. Returns a new tensor.
    """
    p = int(round(dropped.numel() ** 0.5))
    block = dropped.view(p, p).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    fill_t = torch.as_tensor(fill, dtype=pixels.dtype, device=pixels.device)
    fill_t = fill_t.view(-1, 1, 1) if fill_t.ndim == 1 else fill_t
    return torch.where(block.to(pixels.device), fill_t, pixels)


def dropout_masked_map(maps: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``M~^(t)``: the salience maps of pass t with the patches dropped before it set to 0.

    maps: ``[..., N]``; dropped: ``[N]`` bool."""
    return maps.masked_fill(dropped, 0.0)


def dropout_aggregate(masked_maps: torch.Tensor, first_weight: float = 2.0) -> torch.Tensor:
    """Step 4, the summed map over the D drop iterations: ``M^ = w0 M~^(0) + sum_{t>=1} M~^(t)``
    (the reference code counts the first pass twice: w0 = 2).

    masked_maps: ``[D, ..., N]``. Returns ``[..., N]``.
    """
    return first_weight * masked_maps[0] + masked_maps[1:].sum(0)


def minmax(x: torch.Tensor, dims: Sequence[int] = (-1,)) -> torch.Tensor:
    """``(x - min) / (max - min)`` over ``dims``; 0 where the range is empty (a constant map)."""
    lo = x.amin(dim=tuple(dims), keepdim=True)
    hi = x.amax(dim=tuple(dims), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, 1.0), 0.0)


def relative_threshold(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Step 5, thresholding T: ``B_k = M^_k · 1[minmax(M^_k) >= T]`` (raw values kept).

    maps: ``[K, N]``. Returns ``[K, N]``."""
    return maps * (minmax(maps) >= threshold).to(maps.dtype)
