"""`clipseg`: CLIP CRA + DSI, training-free open-vocabulary segmentation with frozen CLIP
(Liu et al., "Unveiling the Knowledge of CLIP for Training-Free Open-Vocabulary Semantic
Segmentation", AAAI 2025; the paper calls it CLIPSeg, it is not the trained CLIPSeg of
Lueddecke and Ecker).

The final ViT block is reformed (Eq. 2, no FFN, no residual): ``Z = Proj(softmax(Attn) V)``
with Attn from the keys of a middle layer M plus relation attention (CRA, Eq. 3) and V the mean
of v_L and the values regenerated from the last blocks without self-attention (DSI, Eq. 4).

The ``attention`` knob also selects the final blocks of the training-free CLIP family
(``clearclip``, ``sclip``, ``naclip``, ``maskclip``; ``family``) and SC-CLIP (``scclip``), each
as its official code computes it, and ``settings.protocol`` their dense-inference protocols
(``protocols``). ``pamr_steps`` > 0 refines any variant's cosines with PAMR (methods/pamr.py).

Modules: ``backbone`` (open_clip loading, tiny configs, text embeddings), ``formulas`` (one
function per equation), ``windows`` (sliding-window geometry), ``vit`` (the single ViT pass of
extract), ``head`` (the few model tensors decode reads), ``variants`` (the ``attention`` values:
the evidence each reads, its decode), ``scclip`` (SC-CLIP's steps), ``reach`` (what a search's
space can reach, decided before Ray), ``evidence`` (extract's CLIP pass), ``segmenter``
(extract), ``decoding`` (decode), ``reference`` (the straight full forward used as ground truth
and as the naive baseline). A second vision model (docs/frontier.md): ``vfm`` (DINO / DINOv2 /
SAM), ``proxy`` (ProxyCLIP), ``trident`` (Trident), ``sam_refine`` (Trident's SAM refinement),
``second`` (their evidence, decode head and pre-Ray checks), ``reference_second`` (their
straight forward).
Choices where the paper is silent are listed in docs/clipseg.md and in the module docstrings:

- ``layer`` is the 1-based block index M (the paper's numbering: "layers 8-9 for CLIP-L",
  Fig. 3 compares layer 9 with the final layer 24); ``kk_last`` uses block L.
- One attention map shared by all heads for kk_last / kk_mid / cra, from the concatenated
  keys (the paper's notation); ``qk`` and the family's blocks work per head.
- G = DBSCAN density-connectedness, cosine distance <= epsilon, core rule ``min_pts``
  (a decode knob, default 5 = scikit-learn's DBSCAN default; 1 = plain transitive closure).
- DSI: FFN of block i with its own ln_2, then the final block's ln_1 and value projection;
  V = mean of v_L and the v~_i of the blocks from ``dsi_start`` on (-1: v_L alone).
- Classes: softmax over all names (synonyms included) of ``logit_scale * cos``, a class's
  probability is its best name's (the family's rule); background by our threshold rule
  (``bg_threshold``) or by the protocol's background query; ``present`` is not used.
"""

from methods.clipseg.segmenter import ClipSegSegmenter

SEGMENTER = ClipSegSegmenter

__all__ = ["SEGMENTER", "ClipSegSegmenter"]
