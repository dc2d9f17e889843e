"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation",
arXiv 2411.15869) as its official code computes it: SuleBai/SC-CLIP 0417ba9
``clip/model.py`` 254-316 (the forward), 318-373 (helpers), 208-227 (LOF). File:line of every
step in docs/scclip-pamr.md.

Notation: a window has T = 1 + P tokens (P patches row-major on a gh x gw grid), width D, H
heads; X_j (j = 0..L-2) is the residual stream after block j + 1 (1-based), the official
``feats_list[j]``; tensors carry a leading batch of windows B (the official code runs one window
at a time; every statistic here is per window). The steps:

1. anomalous tokens: LOF on the patches of X_{L-2} flags the 5 % most outlying
   (:func:`lof_scores`, :func:`anomalous_tokens`); each flagged patch becomes the mean of its
   unflagged 3 x 3 neighbours (:func:`fill_anomalies`), in X_{L-2} and in X_pre;
2. M = cosines of the filled patches of X_pre (``pre_adjust_idx``); x = W(M) x_{L-2} with
   W(M) = M with entries below beta zeroed, rows normalised (:func:`adjust_weights`);
3. the final block's attention only (:func:`self_calibrated_attention`): per head
   A = (softmax(gamma (M - mean M), entries < 0 masked) + softmax(k_h k_h^T / sqrt d)) / 2 on
   ln_1(x), then out_proj, plus ``res_cls`` times X_{L-2}'s class token;
4. out <- W(M_post) out, M_post the cosines of X_post's patches (``post_adjust_idx``, no fill);
5. S = sum_{j = start}^{end - 1} X_j (``multi_start_idx``, ``multi_end_idx``); out +=
   W(M_post) (attention of step 3 on S's patches, same M, + res_cls S's class token);
6. features ln_post(out) proj for the P patches (no class token).

Extract stores what no knob changes (X_{L-2} filled, the cosine Grams, the pieces of the fused
sum); :func:`scclip_output` is the decode part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import OvssError
from methods.clipseg.family import merge_heads, split_heads
from methods.clipseg.packing import pack_symmetric, unpack_symmetric

#: 3 x 3 neighbourhood without its centre (mean_interpolation's kernel, model.py 353-354).
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
#: (lo, hi) of each knob's reachable values in the evidence, and the official knob names.
RANGE_KNOBS = {"pre": "pre_adjust_idx", "post": "post_adjust_idx", "start": "multi_start_idx",
               "end": "multi_end_idx"}


# --- step 1: anomalous tokens ------------------------------------------------------------------
def lof_scores(x: torch.Tensor, neighbours: int) -> torch.Tensor:
    """SC-CLIP's PyTorch LOF (``lof_pytorch``, model.py 208-220): B x P x D -> B x P float32.

    Squared Euclidean distances; each patch's k = ``neighbours`` nearest others (the first of
    k + 1 dropped: itself); reach distance = max(d(p, o), k-distance of **p**) (the official
    code takes p's own k-distance, not o's as textbook LOF does, so it equals p's k-distance);
    lrd(p) = k / mean reach distance; score(p) = mean over p's neighbours o of lrd(o) / lrd(p).
    ``neighbours`` is clamped to P - 1 (the official code fails when P <= 30).
    """
    x = x.float()
    k = min(int(neighbours), x.shape[1] - 1)
    # pairwise, not through Gram products: d(p, o) == d(o, p) bit for bit, as the official
    # norm of differences, so ties (common when k = P - 1) break alike on every path
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    knn_d, knn_i = torch.topk(dist, k=k + 1, dim=-1, largest=False)
    knn_d, knn_i = knn_d[..., 1:], knn_i[..., 1:]
    reach = torch.maximum(knn_d, knn_d[..., -1:].expand_as(knn_d))
    lrd = k / torch.nan_to_num(reach.mean(-1), nan=1e-6)                # B x P
    ratios = torch.gather(lrd[:, None, :].expand(-1, lrd.shape[1], -1), 2, knn_i)
    return (ratios / lrd[..., None]).mean(-1)


def anomalous_tokens(x: torch.Tensor, neighbours: int, contamination: float) -> torch.Tensor:
    """Patches whose LOF score exceeds the (1 - contamination) quantile of their window's scores
    (model.py 222-225): B x P x D -> B x P bool."""
    scores = lof_scores(x, neighbours)
    threshold = torch.quantile(scores, 1.0 - float(contamination), dim=-1, keepdim=True)
    return scores > threshold


def fill_anomalies(x: torch.Tensor, flags: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``mean_interpolation`` (model.py 348-373): each flagged patch becomes the mean of its
    unflagged neighbours in the 3 x 3 window around it on the gh x gw grid (outside the grid
    counts as absent); a flagged patch without such a neighbour keeps its value.

    x: B x P x D, flags: B x P bool (P = gh gw, row-major). Returns B x P x D float32.
    """
    b, p, dim = x.shape
    gh, gw = grid
    keep = (~flags).float().view(b, 1, gh, gw)
    img = x.float().transpose(1, 2).reshape(b, dim, gh, gw) * keep
    img_p, keep_p = F.pad(img, (1, 1, 1, 1)), F.pad(keep, (1, 1, 1, 1))
    total = torch.zeros_like(img)
    count = torch.zeros_like(keep)
    for dy, dx in NEIGHBOURS:
        total += img_p[..., 1 + dy:1 + dy + gh, 1 + dx:1 + dx + gw]
        count += keep_p[..., 1 + dy:1 + dy + gh, 1 + dx:1 + dx + gw]
    mean = (total / count.clamp(min=1)).reshape(b, dim, p).transpose(1, 2)
    update = (flags & (count.view(b, p) > 0))[..., None]
    return torch.where(update, mean, x.float())


def cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of the rows: B x P x D -> B x P x P float32 (model.py 284-285)."""
    f = F.normalize(x.float(), dim=-1)
    return f @ f.transpose(-1, -2)


# --- steps 2-5 ---------------------------------------------------------------------------------
def adjust_weights(m: torch.Tensor, beta: float) -> torch.Tensor:
    """``adaptively_aggregate``'s weights (model.py 287 / 296, 343-346): M with entries below
    beta zeroed, each row divided by its sum + 1e-6. B x P x P -> B x P x P."""
    w = torch.where(m < beta, torch.zeros_like(m), m)
    return w / (w.sum(-1, keepdim=True) + 1e-6)


@dataclass
class FinalAttention:
    """The final block's tensors SC-CLIP's attention reads (decode head): ``ln_1``, the key and
    value rows of ``in_proj`` (D x D each, with biases) and ``out_proj``; ``heads`` H."""

    ln_1: nn.Module
    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    out_proj: nn.Linear
    heads: int


def self_calibrated_attention(x: torch.Tensor, m: torch.Tensor, block: FinalAttention,
                              gamma: float) -> torch.Tensor:
    """``custom_attn`` (model.py 318-341) on tokens x (B x P x D, no class token) with the
    similarity M (B x P x P): per head (softmax(gamma (M - mean M), entries < 0 set to -inf)
    + softmax(k_h k_h^T / sqrt d)) / 2 times v_h, heads concatenated, out_proj (with bias).
    k, v from ln_1(x) (q is computed and unused by the official code). Returns B x P x D."""
    z = block.ln_1(x.float())
    k = F.linear(z, block.w_k, block.b_k)
    v = F.linear(z, block.w_v, block.b_v)
    mid = float(gamma) * (m - m.mean(dim=(-2, -1), keepdim=True))
    mid = mid.masked_fill(mid < 0, float("-inf"))
    shared = torch.softmax(mid, dim=-1) @ v                            # one map for all heads
    kh, vh = split_heads(k, block.heads), split_heads(v, block.heads)
    own = torch.softmax(kh @ kh.transpose(-1, -2) * kh.shape[-1] ** -0.5, dim=-1) @ vh
    return block.out_proj(0.5 * (shared + merge_heads(own)))


def fused_pieces(start: tuple[int, int], end: tuple[int, int]) -> list[tuple[int, int]]:
    """The layer ranges [a, b) whose sums extract stores so that every sum X_s + ... + X_{e-1}
    with s in [start lo, start hi] and e in [end lo, end hi] is a sum of pieces: one layer at a
    time where s or e can fall, the layers every such sum holds as one piece (when the ranges
    do not overlap)."""
    (s_lo, s_hi), (e_lo, e_hi) = start, end
    if s_hi < e_lo:
        return ([(j, j + 1) for j in range(s_lo, s_hi)] + [(s_hi, e_lo)]
                + [(j, j + 1) for j in range(e_lo, e_hi)])
    return [(j, j + 1) for j in range(s_lo, e_hi)]


# --- extract and decode ------------------------------------------------------------------------
def full_layers(num_layers: int) -> dict[str, list[int]]:
    """Every value each index knob can take on an L-block ViT (X_0..X_{L-2})."""
    top = num_layers - 2
    return {"pre": [0, top], "post": [0, top], "start": [0, top], "end": [1, top + 1]}


def scclip_evidence(stream: torch.Tensor, grid: tuple[int, int],
                    layers: Mapping[str, Sequence[int]], neighbours: int,
                    contamination: float) -> dict[str, torch.Tensor]:
    """What SC-CLIP's decode reads, for B windows (float32; knob-free given ``layers``).

    stream: (L-1) x B x T x D, X_0..X_{L-2} (class token first). Returns ``sc_x`` B x P x D
    (X_{L-2}'s patches, anomalies filled), ``sc_cls`` B x D (its class token), ``sc_gram_pre`` /
    ``sc_gram_post`` n x B x P(P+1)/2 (packed cosines of the filled / raw patches of the
    layers in the pre / post range), ``sc_fuse`` pieces x B x T x D (sums of X_j over
    :func:`fused_pieces`), ``sc_flags`` B x P uint8 (the anomalous patches).
    """
    last = stream[-1]
    flags = anomalous_tokens(last[:, 1:], neighbours, contamination)
    pre, post = layers["pre"], layers["post"]
    grams_pre = [pack_symmetric(cosine_gram(fill_anomalies(stream[j][:, 1:], flags, grid)))
                 for j in range(pre[0], pre[1] + 1)]
    grams_post = [pack_symmetric(cosine_gram(stream[j][:, 1:]))
                  for j in range(post[0], post[1] + 1)]
    pieces = fused_pieces(tuple(layers["start"]), tuple(layers["end"]))
    return {"sc_x": fill_anomalies(last[:, 1:], flags, grid), "sc_cls": last[:, 0].float(),
            "sc_gram_pre": torch.stack(grams_pre), "sc_gram_post": torch.stack(grams_post),
            "sc_fuse": torch.stack([stream[a:b].float().sum(0) for a, b in pieces]),
            "sc_flags": flags.to(torch.uint8)}


def _index(params: Mapping[str, Any], part: str, layers: Mapping[str, Sequence[int]]) -> int:
    knob = RANGE_KNOBS[part]
    lo, hi = layers[part]
    value = int(params[knob])
    if not lo <= value <= hi:
        raise OvssError(f"clipseg: {knob}={value} is not in this evidence ({lo}..{hi} stored; "
                        f"settings.scclip_layers)")
    return value


def fused_sum(fuse: torch.Tensor, pieces: Sequence[Sequence[int]], start: int,
              end: int) -> torch.Tensor:
    """X_start + ... + X_{end-1} from the stored pieces: pieces x B x T x D -> B x T x D."""
    pick = [i for i, (a, b) in enumerate(pieces) if start <= a and b <= end]
    return fuse[pick].float().sum(0)


def scclip_output(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                  params: Mapping[str, Any], block: FinalAttention) -> torch.Tensor:
    """Steps 2-5 from the evidence for the knobs ``pre_adjust_idx``, ``post_adjust_idx``,
    ``multi_start_idx``, ``multi_end_idx``, ``res_cls``, ``adjust_beta``, ``mid_gamma``:
    the final output before ln_post, B x P x D float32."""
    layers = meta["sc_layers"]
    pre, post = _index(params, "pre", layers), _index(params, "post", layers)
    start, end = _index(params, "start", layers), _index(params, "end", layers)
    if end <= start:
        raise OvssError(f"clipseg: multi_end_idx ({end}) must exceed multi_start_idx ({start})")
    beta, gamma, res = (float(params["adjust_beta"]), float(params["mid_gamma"]),
                        float(params["res_cls"]))
    p = tensors["sc_x"].shape[1]
    m = unpack_symmetric(tensors["sc_gram_pre"][pre - layers["pre"][0]], p)
    x = adjust_weights(m, beta) @ tensors["sc_x"].float()
    out = self_calibrated_attention(x, m, block, gamma) + res * tensors["sc_cls"].float()[:, None]
    w_post = adjust_weights(unpack_symmetric(tensors["sc_gram_post"][post - layers["post"][0]],
                                             p), beta)
    s = fused_sum(tensors["sc_fuse"], meta["sc_pieces"], start, end)
    fused = self_calibrated_attention(s[:, 1:], m, block, gamma) + res * s[:, :1]
    return w_post @ out + w_post @ fused
