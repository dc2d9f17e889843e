"""FSeg-LLaVA's formulas, one function per symbol (TVR and VGM sections of the paper).

Notation: N image tokens on a gh x gw grid (row-major), Y yes-classes, M candidate attention
maps (layer, head pairs), Dv the visual-encoder width. All maps are float32 unless noted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ENTROPY_VARIANTS = ("area_mean", "mass_2mean")
_EIGHT = np.ones((3, 3), dtype=bool)


def d_tilde(cos_layers: torch.Tensor) -> torch.Tensor:
    """D~(v_i, t_c^0) = 1/(l_e - l_s + 1) sum_{l=l_s..l_e} cos(F^l(v_i), F^l(t_c^0)) (TVR).

    cos_layers: (l_e - l_s + 1) x ... x N per-layer cosine maps -> ... x N (mean over layers).
    """
    return cos_layers.float().mean(0)


def pool_subtokens(maps: torch.Tensor, pool: str) -> torch.Tensor:
    """A multi-token class name's maps n_sub x N -> N: ``mean`` / ``first`` / ``last`` sub-token."""
    if pool == "mean":
        return maps.mean(0)
    if pool == "first":
        return maps[0]
    if pool == "last":
        return maps[-1]
    raise ValueError(f"pool must be mean, first or last, got {pool!r}")


def tau(d_tilde_map: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Dynamic threshold tau = min(alpha * max_i D~(v_i), beta).

    d_tilde_map: ... x N -> ... (one threshold per map).
    """
    return torch.clamp(alpha * d_tilde_map.amax(-1), max=beta)


def d_thresholded(d_tilde_map: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """D(v_i) = D~(v_i) where D~(v_i) >= tau, else 0. ... x N, threshold ... -> ... x N."""
    return torch.where(d_tilde_map >= threshold[..., None], d_tilde_map,
                       torch.zeros_like(d_tilde_map))


def spatial_entropy(a: np.ndarray, variant: str = "area_mean") -> float:
    """Spatial entropy of one attention map (Kang et al., CVPR 2025, which the paper borrows).

    a: gh x gw float map. ``area_mean``: B = ReLU(A - mean A), 8-connected components C_n of
    B > 0, P(C_n) = |C_n| / sum_m |C_m|. ``mass_2mean``: B = ReLU(A - 2 mean A), components of
    B > 1e-3 max(B), P(C_n) = (mass of B in C_n) / (total mass). H = -sum_n P log P; +inf when
    there is no component (lower = more compact).
    """
    a = np.asarray(a, dtype=np.float64)
    if variant == "area_mean":
        b = np.maximum(a - a.mean(), 0.0)
        support = b > 0
    elif variant == "mass_2mean":
        b = np.maximum(a - 2.0 * a.mean(), 0.0)
        support = b > 1e-3 * b.max() if b.max() > 0 else np.zeros_like(b, dtype=bool)
    else:
        raise ValueError(f"entropy variant must be one of {ENTROPY_VARIANTS}, got {variant!r}")
    labels, n = ndimage.label(support, structure=_EIGHT)
    if n == 0:
        return math.inf
    weights = None if variant == "area_mean" else b.ravel()
    p = np.bincount(labels.ravel(), weights=weights, minlength=n + 1)[1:].astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def spatial_entropies(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Every variant for every map: ... x N -> len(ENTROPY_VARIANTS) x ... float32."""
    flat = maps.float().reshape(-1, grid[0], grid[1]).numpy()
    out = [[spatial_entropy(m, v) for m in flat] for v in ENTROPY_VARIANTS]
    return torch.tensor(out, dtype=torch.float32).reshape(len(ENTROPY_VARIANTS), *maps.shape[:-1])


def sink_free(maps: torch.Tensor, grid: tuple[int, int], sink_row: float) -> torch.Tensor:
    """Candidate filter: keep maps whose attention mass on the last grid row is <= ``sink_row``
    (Kang et al. drop such "sink" heads; 1.0 keeps every map). M x N -> M bool."""
    last = maps.float().reshape(maps.shape[0], grid[0], grid[1])[:, -1, :].sum(-1)
    return last <= sink_row


def chord_threshold(values: torch.Tensor) -> float:
    """Kang et al.'s elbow of a set of values: sorted ascending as points (i, v_i), the value of
    the point farthest from the chord joining the first and the last point (the smallest value
    for two values or fewer). values: M -> float."""
    v = torch.sort(values.double().flatten()).values
    if v.numel() <= 2:
        return float(v[0]) if v.numel() else 0.0
    x = torch.arange(v.numel(), dtype=torch.float64)
    dx, dy = x[-1] - x[0], v[-1] - v[0]
    # |cross((x, v) - start, chord)| / |chord|; the norm is shared, so the argmax needs none
    dist = (dx * (v - v[0]) - dy * (x - x[0])).abs()
    return float(v[int(torch.argmax(dist))])


def candidate_heads(maps: torch.Tensor, layers: torch.Tensor, grid: tuple[int, int],
                    sink_row: float, image_mass: str, skip_layers: int) -> torch.Tensor:
    """Which (layer, head) maps may enter the top-K by spatial entropy (Kang et al., CVPR 2025,
    whose code keeps heads whose attention mass on the image reaches the elbow of all heads'
    masses and drops the first two layers; a head that attends mostly to a text sink leaves a
    faint residue on the image whose entropy can be 0).

    maps: M x N attention from the S1 queries to the grid's image tokens (softmax over all
    keys, so a map's sum is its image mass); layers: M 0-based block index of each map.
    ``image_mass``: ``chord`` keeps maps with mass >= :func:`chord_threshold` of the M masses,
    ``none`` keeps all; ``skip_layers``: maps of blocks 0..skip_layers-1 are dropped;
    ``sink_row``: see :func:`sink_free`. -> M bool."""
    keep = sink_free(maps, grid, sink_row) & (layers >= int(skip_layers))
    if image_mass == "chord":
        mass = maps.float().sum(-1)
        keep &= mass.double() >= chord_threshold(mass)
    elif image_mass != "none":
        raise ValueError(f"image_mass must be chord or none, got {image_mass!r}")
    return keep


def a_v(maps: torch.Tensor, entropy: torch.Tensor, k: int,
        keep: torch.Tensor | None = None) -> torch.Tensor | None:
    """A_v: mean of the K candidate maps of lowest spatial entropy (ties: lower index first).

    maps: M x N, entropy: M, keep: M bool (candidates) -> N, or None when no candidate.
    """
    idx = torch.arange(maps.shape[0]) if keep is None else torch.nonzero(keep).flatten()
    if idx.numel() == 0:
        return None
    order = torch.sort(entropy[idx], stable=True).indices[:max(1, int(k))]
    return maps[idx[order]].float().mean(0)


def m_a(a_v_map: torch.Tensor) -> torch.Tensor:
    """M_A = 1[A_v > mean(A_v)]: N -> N float32 in {0, 1}."""
    return (a_v_map > a_v_map.mean()).float()


def d_f(d_map: torch.Tensor, m_a_map: torch.Tensor) -> torch.Tensor:
    """D_f^c = D . M_A (element-wise). ... x N."""
    return d_map * m_a_map


def d_f_bg(d_f_maps: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Background plane D_f^bg = min(alpha * max_{c, i} D_f^c(v_i), beta): Y x N -> scalar
    (0 when there is no yes-class)."""
    if d_f_maps.numel() == 0:
        return torch.zeros(())
    return torch.clamp(alpha * d_f_maps.max(), max=beta)


def guidance_map(d_f_maps: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """M^_f = argmax over {bg, c_1..c_Y} of D_f: Y x ... -> ... int64, 0 = background, j + 1 =
    the j-th yes-class (ties go to the lower index, so to the background first)."""
    stack = torch.cat([bg.expand(1, *d_f_maps.shape[1:]), d_f_maps], 0)
    return argmax0(stack)


def argmax0(stack: torch.Tensor) -> torch.Tensor:
    """``stack.argmax(0)`` (the first maximum wins) for a few planes, one vectorised compare
    per plane: a strided argmax over dim 0 of C x H x W was ~14 ms per call here, this ~2."""
    if stack.shape[0] == 0:
        return stack.argmax(0)
    best = stack[0].clone()
    idx = torch.zeros(stack.shape[1:], dtype=torch.int64)
    for j in range(1, stack.shape[0]):
        better = stack[j] > best
        idx[better] = j
        best = torch.where(better, stack[j], best)
    return idx


def prototypes(fv: torch.Tensor, guide: torch.Tensor, label: int
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """p_c^+ = mean{F_v(i) : M^_f(i) = c}, p_c^- = mean{F_v(i) : M^_f(i) != c}.

    fv: N x Dv, guide: N int64 -> (Dv, Dv) float32; None for an empty set.
    """
    inside = guide == label
    pos = fv[inside].float().mean(0) if inside.any() else None
    neg = fv[~inside].float().mean(0) if (~inside).any() else None
    return pos, neg


def m_v(fv: torch.Tensor, p_pos: torch.Tensor, p_neg: torch.Tensor | None) -> torch.Tensor:
    """M_v^c(i) = 1[cos(F_v(i), p_c^+) > cos(F_v(i), p_c^-)]: N x Dv -> N bool (all True when
    there is no p_c^-, i.e. the class covers every token)."""
    f = fv.float()
    pos = F.cosine_similarity(f, p_pos[None], dim=-1)
    if p_neg is None:
        return torch.ones_like(pos, dtype=torch.bool)
    return pos > F.cosine_similarity(f, p_neg[None], dim=-1)


def m_r(m_v_map: torch.Tensor, guide: torch.Tensor, label: int) -> torch.Tensor:
    """M_r^c = M_v^c . M^_f^c with M^_f^c = 1[M^_f = c]: ... bool."""
    return m_v_map & (guide == label)
