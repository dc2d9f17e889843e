"""The decode head of ``clipseg``: the few model tensors decode reads, without the model.

Decode runs no transformer block: it reads the final block's attention output projection
(``out_proj``, with its head count), ``ln_post`` and ``proj``; ``scclip`` also the final block's
``ln_1`` and the key / value rows of its ``in_proj`` (its attention runs at decode on inputs
the knobs choose). A trial worker that decodes cached
evidence builds the segmenter from this head (``ClipSegSegmenter.from_decode_state``; the search
keeps it in the evidence cache, ``search.trial``) instead of the whole CLIP (600 MB for
ViT-B/16 in float32, the head about 4 MB). Decode from the head is the very computation of
decode with the model: the full segmenter reads its parameters from its own head too.
"""

from __future__ import annotations

import torch

from methods.base import Evidence, OvssError

#: Version of the head's layout (tensor names and meta fields below).
HEAD_VERSION = 2


def decode_head(model: torch.nn.Module, model_name: str) -> Evidence:
    """What decode reads from an open_clip CLIP, as an :class:`Evidence` (D width, E embedding):

    tensors ``out_proj.weight`` D x D and ``out_proj.bias`` D (the final block's attention
    output projection; the bias when it has one), ``ln_post.weight`` / ``ln_post.bias`` D,
    ``proj`` D x E, ``ln_1.weight`` / ``ln_1.bias`` D and ``in_proj_kv.weight`` 2D x D (the key
    then value rows of the final block's ``in_proj``; ``in_proj_kv.bias`` 2D when it has one),
    ``image_mean`` / ``image_std`` 3, all float32 on the CPU; meta ``heads`` (of the final
    block), ``patch`` (px), ``num_layers``, ``ln_eps``, ``ln_1_eps``, ``model_name`` (open_clip's).
    About 9 MB for ViT-B/16 (the model: 600 MB).
    """
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    final = block.attn
    for what, ln in (("ln_post", visual.ln_post), ("ln_1 of the final block", block.ln_1)):
        if not isinstance(ln, torch.nn.LayerNorm) or ln.weight is None or ln.bias is None:
            raise OvssError(f"clipseg: {what} of the ViT is {type(ln).__name__}, "
                            f"not a LayerNorm with weight and bias")
    ln = visual.ln_post
    dim = final.embed_dim

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone().contiguous()

    tensors = {"out_proj.weight": cpu(final.out_proj.weight),
               "ln_post.weight": cpu(ln.weight), "ln_post.bias": cpu(ln.bias),
               "proj": cpu(visual.proj),
               "ln_1.weight": cpu(block.ln_1.weight), "ln_1.bias": cpu(block.ln_1.bias),
               "in_proj_kv.weight": cpu(final.in_proj_weight[dim:]),
               "image_mean": torch.tensor(visual.image_mean, dtype=torch.float32),
               "image_std": torch.tensor(visual.image_std, dtype=torch.float32)}
    if final.out_proj.bias is not None:
        tensors["out_proj.bias"] = cpu(final.out_proj.bias)
    if final.in_proj_bias is not None:
        tensors["in_proj_kv.bias"] = cpu(final.in_proj_bias[dim:])
    meta = {"head_version": HEAD_VERSION, "model_name": model_name, "heads": int(final.num_heads),
            "patch": int(visual.patch_size[0]), "num_layers": len(visual.transformer.resblocks),
            "ln_eps": float(ln.eps), "ln_1_eps": float(block.ln_1.eps)}
    return Evidence(tensors, meta)


def same_head(a: Evidence, b: Evidence) -> bool:
    """Whether two decode heads hold the same tensors (bit for bit) and the same numbers."""
    keys = ("head_version", "model_name", "heads", "patch", "num_layers", "ln_eps", "ln_1_eps")
    return (set(a.tensors) == set(b.tensors)
            and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
            and all(a.meta.get(k) == b.meta.get(k) for k in keys))


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """``nn.Linear`` (out x in ``weight``) holding these very tensors, no gradient."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias, requires_grad=False)
    return lin


def frozen_layer_norm(weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> torch.nn.LayerNorm:
    """``nn.LayerNorm`` over the last dimension holding these very tensors, no gradient."""
    ln = torch.nn.LayerNorm(weight.shape[0], eps=eps, device="meta")
    ln.weight = torch.nn.Parameter(weight, requires_grad=False)
    ln.bias = torch.nn.Parameter(bias, requires_grad=False)
    return ln
