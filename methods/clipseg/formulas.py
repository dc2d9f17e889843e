"""The paper's formulas, one function per symbol (Liu et al., AAAI 2025, "Unveiling the
Knowledge of CLIP for Training-Free Open-Vocabulary Semantic Segmentation").

Notation: a window has T = 1 + P tokens (class token first, then P patches in row-major order),
width D, H heads of d = D / H channels; tensors carry a leading batch of windows ``B``.
Every function is pure tensor code (float32 in, float32 out unless stated).

Choices (documented in docs/clipseg.md as well):
- Attention is one T x T map shared by all heads, built from the concatenated keys (the paper's
  notation: "we concatenate the output from multi-head attention to form a single query q,
  key k and value v for each layer"; Eq. 3 uses this k_M). The `qk` baseline is the final
  block's original per-head q-k attention, averaged over heads (what nn.MultiheadAttention
  returns as its attention map).
- G (relation attention) is DBSCAN's density-connectedness on the patch keys with cosine
  distance <= epsilon and a core-point rule |N_eps| >= min_pts (min_pts = 1: every patch is a
  core point and G is the transitive closure of the epsilon-graph); noise patches relate to none.
  The closure is computed as connected components by min-label propagation with pointer
  jumping (O(P^2) tensor rounds; fewer operations than log2(P) boolean P x P matrix squarings).
- DSI combines v_L and the regenerated deep values by their mean ("ensemble", Sec. Experiments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_gram(k: torch.Tensor) -> torch.Tensor:
    """k_M k_M^T of Eq. 3: cosine similarities of the L2-normalised (heads concatenated) keys.

    k: B x T x D (any float dtype). Returns B x T x T float32 in [-1, 1], diagonal 1.
    """
    kn = F.normalize(k.float(), dim=-1)
    return kn @ kn.transpose(-1, -2)


def connected_components(adj: torch.Tensor) -> torch.Tensor:
    """Component labels of an undirected boolean graph, as tensor operations.

    adj: B x N x N bool, symmetric. Returns B x N int64: ``labels[b, i]`` is the smallest node
    index of i's component, so i and j are linked through a chain of edges (the transitive
    closure of adj) iff their labels are equal. Min-label propagation (every node takes the
    smallest label among itself and its neighbours) with pointer jumping (a node takes its
    label's label); each round is O(N^2) per graph and labels only decrease, so it stops after
    at most N rounds (in practice a few), when nothing changes.
    """
    b, n, _ = adj.shape
    adj = adj | torch.eye(n, dtype=torch.bool, device=adj.device)
    labels = torch.arange(n, device=adj.device).expand(b, n).contiguous()
    for _ in range(n):
        nxt = torch.where(adj, labels[:, None, :], n).amin(-1)          # min over neighbours
        nxt = nxt.gather(1, nxt)                                          # pointer jumping
        if torch.equal(nxt, labels):
            break
        labels = nxt
    return labels


def relation_attention(
    gram: torch.Tensor, epsilon: float, min_pts: int = 1
) -> torch.Tensor:
    """G(k_M) of Eq. 3: relation attention by soft DBSCAN.

    Two patches get weight ``epsilon`` when they are density-connected (DBSCAN) under cosine
    distance ``1 - cos <= epsilon``, else 0: a patch is a core point when its epsilon
    neighbourhood (itself included) has at least ``min_pts`` patches; i and j are connected when
    some core points o, o' lie in one chain of core points each within epsilon of the next
    (a connected component of the core points' epsilon graph), with i within epsilon of o and j
    within epsilon of o'. Patches that are no core point's neighbour (DBSCAN noise) are related
    to nothing, not even themselves.

    gram: B x P x P float, cosine similarities of patch keys (patches only, no class token).
    Returns B x P x P float32 with values in {0, epsilon}, symmetric.
    """
    b, p, _ = gram.shape
    near = (1.0 - gram.float()) <= epsilon                         # B x P x P, N_eps
    near = near | near.transpose(1, 2)                              # exact symmetry
    core = near.sum(-1) >= min_pts                                  # B x P
    labels = connected_components(near & core[:, :, None] & core[:, None, :])
    if bool(core.all()):                    # no border or noise points: same component
        connected = labels[:, :, None] == labels[:, None, :]
    else:
        # touches[b, i, c]: i is within epsilon of a core point of component c
        touches = torch.zeros(b, p, p, device=gram.device)
        touches.scatter_reduce_(2, labels[:, None, :].expand(b, p, p),
                                (near & core[:, None, :]).float(), reduce="amax")
        connected = (touches @ touches.transpose(1, 2)) > 0
    return connected.float() * float(epsilon)


def coherence_residual_attention(
    gram: torch.Tensor, tau: float, relation: torch.Tensor | None = None
) -> torch.Tensor:
    """Attn of Eq. 3 (CRA): ``(k_M k_M^T + G(k_M)) * tau`` (pre-softmax logits).

    gram:     B x N x T float, rows of k_M k_M^T for the N output tokens against all T tokens.
    relation: B x N x T float G (zero for the class token), or None for the plain k_M-k_M
              self-self attention (the `kk_mid` / `kk_last` variants).
    Returns B x N x T float32.
    """
    logits = gram.float() if relation is None else gram.float() + relation
    return logits * float(tau)


def original_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """The `qk` baseline: CLIP's own attention of the final block, softmax(q_h k_h^T / sqrt(d))
    per head, averaged over the H heads (attention probabilities, rows sum to 1).

    q, k: B x T x D. Returns B x T x T float32.
    """
    b, t, dim = q.shape
    d = dim // heads
    qh = q.float().view(b, t, heads, d).transpose(1, 2)
    kh = k.float().view(b, t, heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1).mean(1)


def dense_output(
    attn: torch.Tensor, value: torch.Tensor, out_proj: nn.Linear | None = None,
    out_bias: torch.Tensor | None = None, probabilities: bool = False,
) -> torch.Tensor:
    """Z_v of Eq. 2, the reformed final block: ``Proj(softmax(Attn) . V)``, no FFN, no residual.

    attn:  B x N x T logits (or probabilities when ``probabilities``).
    value: B x T x D, the value V (raw, then ``out_proj`` is Proj), or already multiplied by
           Proj's weight (V W_o^T, then give only ``out_bias``: rows of softmax(Attn) sum to 1,
           so Proj(A V) = A (V W_o^T) + b_o).
    Returns B x N x D float32.
    """
    a = attn.float() if probabilities else torch.softmax(attn.float(), dim=-1)
    z = a @ value.float()
    if out_proj is not None:
        z = out_proj(z)
    elif out_bias is not None:
        z = z + out_bias.float()
    return z


def deep_layer_output(x_prev: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """x~_i of Eq. 4: ``x_{i-1} + FFN_i(x_{i-1})``, block i with its self-attention skipped.

    FFN is the block's own pre-norm MLP as in Eq. 1, ``ls_2(mlp(ln_2(x)))`` (open_clip
    ResidualAttentionBlock). x_prev: B x T x D, the input of block i. Returns B x T x D.
    """
    return x_prev + block.ls_2(block.mlp(block.ln_2(x_prev)))


def deep_value(x_tilde: torch.Tensor, final_block: nn.Module) -> torch.Tensor:
    """v~_i of Eq. 4: ``w_L^v . x~_i``, projected by the *final* block's value projection.

    The final block's ln_1 is applied first, as for v_L itself (v_L = w_L^v ln_1^L(x_{L-1})),
    so v~_i and v_L live in the same space. x_tilde: B x T x D. Returns B x T x D.
    """
    dim = x_tilde.shape[-1]
    attn = final_block.attn
    w_v = attn.in_proj_weight[2 * dim:]
    b_v = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else None
    return F.linear(final_block.ln_1(x_tilde), w_v, b_v)


def integrated_value(terms: torch.Tensor, dsi_start: int) -> torch.Tensor:
    """V of the DSI module: the mean of v_L and the v~_i of the layers from ``dsi_start`` on.

    terms: K x B x T x D, ``terms[0] = v_L``, ``terms[j] = v~_{L-j}`` (j = 1..K-1).
    dsi_start: l in {-1, ..., -K}; -1 uses v_L alone, -3 averages v_L, v~_{L-1}, v~_{L-2}.
    Returns B x T x D float32.
    """
    n = -int(dsi_start)
    if not 1 <= n <= terms.shape[0]:
        raise ValueError(f"dsi_start {dsi_start} outside -1..-{terms.shape[0]}")
    return terms[:n].float().mean(0)
