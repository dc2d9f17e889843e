"""The CLIP pass of ``extract``: one ViT pass per chunk of windows, keeping the evidence tensors
of the variants extract serves (segmenter.py's table, variants.py's ``NEEDS``) and, for
``proxyclip`` / ``trident``, v_L of every token (second.py reads it instead of a pass of its
own)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from methods.clipseg.scclip import scclip_evidence
from methods.clipseg.variants import DSI_TERMS, window_tensors
from methods.clipseg.vit import window_pass
from methods.clipseg.windows import WindowGrid

#: Tensors whose window axis is the second (stacked per layer / term / block).
BATCH_DIM = {"key_gram": 1, "values": 1, "fixed_cos": 1, "sc_gram_pre": 1, "sc_gram_post": 1,
             "sc_fuse": 1}


@torch.no_grad()
def clip_evidence(seg: Any, windows: torch.Tensor, grid: WindowGrid, text: torch.Tensor,
                  dtype: torch.dtype, keep: Collection[str], scclip: bool, want_values: bool
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``keep``'s tensors (and SC-CLIP's with ``scclip``) of the windows (W x 3 x ph x pw) in
    ``dtype`` on the CPU (``sc_flags`` uint8), and with ``want_values`` v_L (W x T x D
    float32, else None). ``seg``: the segmenter (visual, features, settings, device)."""
    final = seg.visual.transformer.resblocks[-1]
    parts: dict[str, list[torch.Tensor]] = {}
    v_last: list[torch.Tensor] = []
    chunk = max(1, int(seg.settings["chunk"]))
    for i in range(0, len(windows), chunk):
        ev = window_pass(seg.visual, windows[i:i + chunk].to(seg.device), DSI_TERMS,
                         keep_stream=scclip)
        out = window_tensors(ev, final, lambda z: seg.features(z) @ text.T, keep)
        if scclip:
            out.update(scclip_evidence(ev.stream, (grid.gh, grid.gw), seg.scclip_layers,
                                       int(seg.settings["lof_neighbors"]),
                                       float(seg.settings["lof_contamination"])))
        for key, t in out.items():
            parts.setdefault(key, []).append(t.to(torch.uint8 if key == "sc_flags"
                                                  else dtype).cpu())
        if want_values:
            v_last.append(ev.terms[0].float())
    tensors = {k: torch.cat(v, BATCH_DIM.get(k, 0)).contiguous() for k, v in parts.items()}
    return tensors, (torch.cat(v_last) if want_values else None)
