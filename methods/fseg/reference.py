"""The straight pipeline, as the paper's code would run one configuration: per class a full
``generate`` (``qa: model``) and a full teacher-forced forward over the whole sequence with the
image (``output_hidden_states``, ``output_attentions``), the maps computed from those tensors
for the chosen layers only, then ``SamPredictor.set_image`` + ``predict``.

It shares nothing cached with ``extract``/``decode``: no prefix KV cache, no stored cosine maps
or entropies, no SAM embedding reuse. Tests use it as ground truth for ``decode(extract(x), p)``;
``bench/fseg.py`` times it as the naive search (one run per trial and image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, check_image
from methods.fseg import formulas as fm
from methods.fseg.llava_pass import encode_image, pixel_inputs
from methods.fseg.pipeline import (
    Geometry,
    check_params,
    fused_response,
    head_filter,
    label_map,
    torch_threads,
)
from methods.fseg.qap import answer_tokens, canonical_answer, is_yes, prefix_ids, question_ids
from methods.fseg.sam import sam_predict


@torch.no_grad()
def straight_labels(seg: Any, image: np.ndarray, classes: ClassSet, params: Mapping[str, Any],
                    present: Sequence[int] | None = None) -> np.ndarray:
    """The whole FSeg-LLaVA pipeline for one image and one configuration: H x W int64."""
    image = check_image(image)
    llava, s, dev = seg.llava, seg.settings, seg.device
    mode = seg.qa_mode(present)
    hs_idx, attn_idx = check_params(params, seg.num_layers)
    tokens = encode_image(llava, image, bool(s["pad_to_square"]), s["grid"], s["vgm_features"],
                          dev)                                    # F_v, layout
    inputs, _ = pixel_inputs(llava, image, bool(s["pad_to_square"]))
    inputs = {k: (v.to(dev, llava.dtype) if v.is_floating_point() else v.to(dev))
              for k, v in inputs.items()}
    prefix = prefix_ids(llava.tokenizer, llava.template, llava.image_token_id, tokens.n_tokens)
    img_pos = torch.nonzero(torch.tensor(prefix) == llava.image_token_id).flatten()
    grid_pos = img_pos[tokens.positions].to(dev)
    tok = llava.tokenizer
    yes, d_tilde, masks = [], [], []
    for c in classes.foreground:
        name = classes.prompts[c][0]
        q = question_ids(tok, llava.template, name)
        ids = torch.tensor([prefix + q], device=dev)
        if mode == "model":
            out = llava.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       **inputs, do_sample=False, num_beams=1,
                                       max_new_tokens=int(s["max_new_tokens"]),
                                       eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if not is_yes(text):
                continue
        elif c not in set(present or ()):
            continue
        else:
            text = canonical_answer(name)
        ans = answer_tokens(tok, text, name)
        full = torch.tensor([prefix + q + ans.ids], device=dev)
        out = llava.model(input_ids=full, **inputs, output_hidden_states=True,
                          output_attentions=True, logits_to_keep=1)
        start = len(prefix) + len(q)
        cls = [start + i for i in ans.class_tokens]
        per_layer = torch.stack([                                   # n_layers x n_sub x N
            F.cosine_similarity(out.hidden_states[i][0, cls][:, None].float(),
                                out.hidden_states[i][0, grid_pos][None].float(), dim=-1)
            for i in hs_idx])
        d_tilde.append(fm.pool_subtokens(fm.d_tilde(per_layer), params["pool"]))
        masks.append(_attention_mask(out.attentions, [start + i for i in ans.s1_tokens],
                                     grid_pos, attn_idx, params, tokens.grid))
        yes.append(c)
    h, w = image.shape[:2]
    if not yes:
        return np.zeros((h, w), dtype=np.int64)
    d_tilde_maps = torch.stack(d_tilde).cpu()
    d_f_maps = fused_response(d_tilde_maps, masks, params)
    seg.predictor.set_image(image)
    try:  # the knob side with decode's thread setting, so the two compare like for like
        with torch_threads(int(s["decode_threads"])):
                return label_map(d_f_maps, d_tilde_maps, tokens.fv, yes, classes.background,
                             Geometry((h, w), tokens.grid, tokens.view), params,
                             lambda p, b: sam_predict(seg.predictor, p, b,
                                                      bool(params["multimask"])))
    finally:
        seg.predictor.reset_image()


def _attention_mask(attentions: Sequence[torch.Tensor], s1: list[int], grid_pos: torch.Tensor,
                    attn_idx: Sequence[int], params: Mapping[str, Any],
                    grid: tuple[int, int]) -> torch.Tensor | None:
    """M_A from the full attention tensors (1 x H x T x T per block), entropies on the fly."""
    if not s1:
        return None
    layers = range(len(attentions)) if params["attn_layers"] == "all" else attn_idx
    maps = torch.cat([attentions[i][0][:, s1][:, :, grid_pos].float().mean(1).cpu()
                      for i in layers])                               # M x N
    entropy = torch.tensor([fm.spatial_entropy(m.reshape(grid).numpy(), params["entropy"])
                            for m in maps])
    layer_of = torch.tensor([i for i in layers for _ in range(attentions[i].shape[1])])
    keep = head_filter(maps, layer_of, params, grid)
    av = fm.a_v(maps, entropy, int(params["K"]), keep)
    return None if av is None else fm.m_a(av)
