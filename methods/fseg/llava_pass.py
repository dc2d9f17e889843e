"""The knob-independent LLaVA passes of extract: vision tower once, shared prefix once, then
per class a short pass from the prefix's KV cache.

Causal attention makes the image tokens' hidden states independent of the question, so the
prefix (template head + image tokens) is run once per image (``output_hidden_states``) and its KV
cache is rolled back after every class. Per class:

- ``qa: model``: greedy decoding (``max_new_tokens``, stop at EOS) from the cache;
- yes-classes: one teacher-forced pass over question + answer with ``output_hidden_states`` and
  eager ``output_attentions`` (queries = question + answer only, so the attention tensors are
  small even for LLaVA-1.6's ~3k tokens; the softmax still runs over every key). Up to
  ``class_batch`` yes-classes go in one batched pass: the prefix cache is repeated per row and
  shorter rows are padded on the right, which changes nothing for their real tokens (causal
  attention: a real token never sees a later pad; positions are the same arange after the
  prefix). A 40-token pass is weight-bound on a CPU (the GEMMs pack every weight for a few
  rows), so three classes in one pass cost about one and a half.

Kept per yes-class: per-layer cosine maps cos(F^l(v_i), F^l(t)) for every hidden state l = 0..L
and every sub-token t of the class name (L+1 x n_sub x N), and per layer and head the attention
from the S1 tokens to the grid's image tokens, averaged over the S1 queries (L x H x N).

Hidden-state indexing (transformers): ``hidden_states[0]`` is the input embedding,
``hidden_states[l]`` the output of decoder block l (the last one after the final norm);
``attentions[l - 1]`` is block l's attention.

Grids: LLaVA-1.5 is gh x gw = (S/14)^2 row-major. LLaVA-1.6 packs a base view (the whole image
squashed to S x S) then the AnyRes high-res grid, unpadded, with a newline token closing each
row; the layout is read by running the model's own ``pack_image_features`` on token indices.
``grid: base`` uses the base view, ``highres`` the high-res grid (newline tokens dropped).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from methods.base import OvssError
from methods.fseg.backbone import TRANSFORMERS_RANGE, Llava
from methods.fseg.qap import AnswerTokens, prefix_ids, question_ids


@dataclass
class ImageTokens:
    """What the vision side of LLaVA gives for one image.

    grid: (gh, gw); view: (y0, x0, bh, bw) the image box the grid covers (pixels);
    positions: N indices into the image-token run forming the grid (row-major);
    fv: N x Dv visual-encoder features F_v on the grid; vision: the encoder output the model
    forward takes as ``mm_encoder_outputs["image"]``; n_tokens: image tokens in the sequence.
    """

    grid: tuple[int, int]
    view: tuple[int, int, int, int]
    positions: torch.Tensor
    fv: torch.Tensor
    vision: Any
    n_tokens: int


def pad_to_square(image: np.ndarray, fill: Sequence[float]) -> tuple[np.ndarray, int, int]:
    """LLaVA-1.5's ``expand2square``: centre the image on an S x S canvas (S = max(H, W)) filled
    with ``int(255 * mean)``. Returns (canvas, top, left)."""
    h, w = image.shape[:2]
    s = max(h, w)
    canvas = np.empty((s, s, 3), dtype=np.uint8)
    canvas[:] = np.array([int(255 * m) for m in fill], dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas, top, left


def pixel_inputs(llava: Llava, image: np.ndarray, pad: bool
                 ) -> tuple[dict[str, torch.Tensor], tuple[int, int, int, int]]:
    """Processor inputs and the view box. LLaVA-1.5: pad to square (or the processor's own
    resize + centre crop); LLaVA-1.6: the processor's AnyRes tiles."""
    h, w = image.shape[:2]
    proc = llava.image_processor
    if llava.arch == "llava_next":
        inputs = proc(images=Image.fromarray(image), return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}, \
            (0, 0, h, w)
    if pad:
        canvas, top, left = pad_to_square(image, proc.image_mean)
        view = (-top, -left, canvas.shape[0], canvas.shape[1])
    else:
        canvas, m = image, min(h, w)
        view = ((h - m) // 2, (w - m) // 2, m, m)
    inputs = proc(images=Image.fromarray(canvas), return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"]}, view


def next_layout(llava: Llava, n_tiles: int, hw: int, image_size: torch.Tensor) -> torch.Tensor:
    """LLaVA-1.6 packing of one image: per packed token, ``tile * hw + cell`` or -1 (newline)."""
    idx = torch.arange(n_tiles * hw, dtype=torch.float64).reshape(n_tiles, hw, 1)
    packed, _ = llava.model.model.pack_image_features(
        [idx], image_size, vision_feature_select_strategy="default",
        image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return packed[0][:, 0].round().long()


@torch.no_grad()
def encode_image(llava: Llava, image: np.ndarray, pad: bool, grid: str,
                 features: str, device: str) -> ImageTokens:
    """Vision tower + projector once; F_v is the selected vision layer's patch tokens
    (``features: vision``, CLS dropped) or the projector output (``projector``)."""
    model, cfg = llava.model, llava.model.config
    inputs, view = pixel_inputs(llava, image, pad)
    inputs = {k: (v.to(device, llava.dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    out = model.model.get_image_features(
        **inputs, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        output_hidden_states=True, return_dict=True)
    vis = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        vis = vis[:, 1:]
    packed = torch.cat(list(out.pooler_output), 0)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    hw = side * side
    if llava.arch == "llava":
        positions = torch.arange(hw)
        tile_index, shape = positions, (side, side)
    else:
        layout = next_layout(llava, vis.shape[0], hw, inputs["image_sizes"].cpu())
        if grid == "base":
            positions, shape = torch.arange(hw), (side, side)
        else:
            positions = torch.nonzero(layout >= hw).flatten()
            rows = int((layout == -1).sum())
            shape = (rows, positions.numel() // max(rows, 1))
        tile_index = layout[positions]
    if features == "vision":
        fv = vis.reshape(-1, vis.shape[-1])[tile_index.to(vis.device)]
    else:
        fv = packed[positions.to(packed.device)]
    return ImageTokens(shape, view, positions, fv.float().cpu(), out, packed.shape[0])


@dataclass
class ClassEvidence:
    """One class's QAP result and, for a yes-class, its maps (see the module docstring)."""

    answer: str
    yes: bool
    cos: torch.Tensor | None = None        # (L+1) x n_sub x N float32
    attn: torch.Tensor | None = None       # L x H x N float32
    has_s1: bool = False
    fallback: bool = False


class PrefixRunner:
    """The shared prefix of one image and the per-class passes from its KV cache."""

    def __init__(self, llava: Llava, tokens: ImageTokens, device: str):
        self.llava, self.tokens, self.device = llava, tokens, device
        ids = prefix_ids(llava.tokenizer, llava.template, llava.image_token_id, tokens.n_tokens)
        self.prefix = torch.tensor([ids], device=device)
        img_pos = torch.nonzero(self.prefix[0] == llava.image_token_id).flatten()
        self.grid_pos = img_pos[tokens.positions.to(device)]
        with torch.no_grad():
            out = llava.model(input_ids=self.prefix, mm_encoder_outputs={"image": tokens.vision},
                              use_cache=True, output_hidden_states=True, logits_to_keep=1)
        self.cache = out.cache
        if self.cache is None or self.cache.get_seq_length() != self.prefix.shape[1]:
            raise OvssError("fseg: the LLaVA forward returned no prefix KV cache (`out.cache`); "
                            f"transformers {TRANSFORMERS_RANGE} is needed")
        # Unit-norm image-token states per hidden layer: (L+1) x N x D float32.
        self.image_states = torch.stack([F.normalize(h[0, self.grid_pos].float(), dim=-1)
                                         for h in out.hidden_states])

    def _rollback(self) -> None:
        extra = self.cache.get_seq_length() - self.prefix.shape[1]
        if extra > 0:
            self.cache.crop(-extra)

    def _forward(self, ids: Sequence[int], **kw: Any) -> Any:
        x = torch.tensor([list(ids)], device=self.device)
        return self.llava.model(input_ids=x, cache=self.cache, use_cache=True, **kw)

    @torch.no_grad()
    def generate(self, c_name: str, max_new_tokens: int) -> str:
        """Greedy decoding of the answer to the class's question (EOS excluded)."""
        tok = self.llava.tokenizer
        q = question_ids(tok, self.llava.template, c_name)
        try:
            logits = self._forward(q, logits_to_keep=1).logits[0, -1]
            gen: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                gen.append(nxt)
                if len(gen) == max_new_tokens:
                    break
                logits = self._forward([nxt], logits_to_keep=1).logits[0, -1]
        finally:
            self._rollback()
        return tok.decode(gen, skip_special_tokens=True).strip()

    @torch.no_grad()
    def analyse(self, c_name: str, ans: AnswerTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced question + answer: ((L+1) x n_sub x N cosines, L x H x N attention)."""
        return self.analyse_many([(c_name, ans)])[0]

    @torch.no_grad()
    def analyse_many(self, items: Sequence[tuple[str, AnswerTokens]], batch: int = 4
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``analyse`` for several classes, ``batch`` rows per pass (see the module docstring)."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(items), max(1, batch)):
            out.extend(self._analyse_rows(items[start:start + max(1, batch)]))
        return out

    def _analyse_rows(self, items: Sequence[tuple[str, AnswerTokens]]
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tok, template = self.llava.tokenizer, self.llava.template
        qs = [question_ids(tok, template, c) for c, _ in items]
        rows = [[*q, *ans.ids] for q, (_, ans) in zip(qs, items)]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        x = torch.tensor([r + [int(pad or 0)] * (width - len(r)) for r in rows],
                         device=self.device)
        if len(rows) == 1:
            cache = self.cache
        else:  # a private copy: the shared prefix cache stays batch 1
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(rows))
        try:
            res = self.llava.model(input_ids=x, cache=cache, use_cache=True,
                                   output_hidden_states=True, output_attentions=True,
                                   logits_to_keep=1)
        finally:
            if len(rows) == 1:
                self._rollback()
            del cache
        heads = res.attentions[0].shape[1]
        found = []
        for b, (q, (_, ans)) in enumerate(zip(qs, items)):
            cls = torch.tensor([len(q) + i for i in ans.class_tokens], device=self.device)
            cos = torch.stack([F.normalize(h[b, cls].float(), dim=-1) @ img.T
                               for h, img in zip(res.hidden_states, self.image_states)])
            s1 = torch.tensor([len(q) + i for i in ans.s1_tokens], device=self.device,
                              dtype=torch.long)
            if s1.numel() == 0:
                attn = torch.zeros(len(res.attentions), heads, self.grid_pos.numel())
            else:
                attn = torch.stack([a[b][:, s1][:, :, self.grid_pos].float().mean(1)
                                    for a in res.attentions])
            found.append((cos.cpu(), attn.cpu()))
        return found
