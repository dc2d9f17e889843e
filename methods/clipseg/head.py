"""The decode head of ``clipseg``: the few model tensors decode reads, without the model.

Decode runs no transformer block: it reads the final block's attention output projection
(``out_proj``, with its head count), ``ln_post`` and ``proj``. A trial worker that decodes cached
evidence builds the segmenter from this head (``ClipSegSegmenter.from_decode_state``; the search
keeps it in the evidence cache, ``search.trial``) instead of the whole CLIP (600 MB for
ViT-B/16 in float32, the head about 4 MB). Decode from the head is the very computation of
decode with the model: the full segmenter reads its parameters from its own head too.
"""

from __future__ import annotations

import torch

from methods.base import Evidence, OvssError

#: Version of the head's layout (tensor names and meta fields below).
HEAD_VERSION = 1


def decode_head(model: torch.nn.Module, model_name: str) -> Evidence:
    """What decode reads from an open_clip CLIP, as an :class:`Evidence` (D width, E embedding):

    tensors ``out_proj.weight`` D x D and ``out_proj.bias`` D (the final block's attention
    output projection; the bias when it has one), ``ln_post.weight`` / ``ln_post.bias`` D,
    ``proj`` D x E, ``image_mean`` / ``image_std`` 3, all float32 on the CPU; meta ``heads``
    (of the final block), ``patch`` (px), ``num_layers``, ``ln_eps``, ``model_name`` (open_clip's).
    About 4 MB for ViT-B/16 (the model: 600 MB).
    """
    visual = model.visual
    final = visual.transformer.resblocks[-1].attn
    ln = visual.ln_post
    if not isinstance(ln, torch.nn.LayerNorm) or ln.weight is None or ln.bias is None:
        raise OvssError(f"clipseg: ln_post of the ViT is {type(ln).__name__}, "
                        f"not a LayerNorm with weight and bias")

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone().contiguous()

    tensors = {"out_proj.weight": cpu(final.out_proj.weight),
               "ln_post.weight": cpu(ln.weight), "ln_post.bias": cpu(ln.bias),
               "proj": cpu(visual.proj),
               "image_mean": torch.tensor(visual.image_mean, dtype=torch.float32),
               "image_std": torch.tensor(visual.image_std, dtype=torch.float32)}
    if final.out_proj.bias is not None:
        tensors["out_proj.bias"] = cpu(final.out_proj.bias)
    meta = {"head_version": HEAD_VERSION, "model_name": model_name, "heads": int(final.num_heads),
            "patch": int(visual.patch_size[0]), "num_layers": len(visual.transformer.resblocks),
            "ln_eps": float(ln.eps)}
    return Evidence(tensors, meta)


def same_head(a: Evidence, b: Evidence) -> bool:
    """Whether two decode heads hold the same tensors (bit for bit) and the same numbers."""
    keys = ("head_version", "model_name", "heads", "patch", "num_layers", "ln_eps")
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
