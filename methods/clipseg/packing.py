"""Symmetric T x T maps stored as their upper triangle (the key Gram matrices of the evidence)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _triu(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    iu = torch.triu_indices(t, t)
    return iu[0], iu[1]


@functools.lru_cache(maxsize=8)
def _unpack_index(t: int) -> torch.Tensor:
    """T*T indices into the packed upper triangle: entry (i, j) -> position of (min, max)."""
    pos = torch.empty(t, t, dtype=torch.long)
    r, c = _triu(t)
    pos[r, c] = torch.arange(len(r))
    pos[c, r] = torch.arange(len(r))
    return pos.flatten()


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """... x T x T symmetric -> ... x T(T+1)/2 (upper triangle, row-major)."""
    r, c = _triu(m.shape[-1])
    return m[..., r, c]


def unpack_symmetric(p: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`pack_symmetric`: ... x T(T+1)/2 -> ... x T x T float32."""
    return p.float().index_select(-1, _unpack_index(t)).unflatten(-1, (t, t))
