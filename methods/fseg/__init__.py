"""`fseg`: FSeg-LLaVA (Zhang et al., "The Power of Prior: Training-Free Open-Vocabulary Semantic
Segmentation with LLaVA", CVPR 2026): LLaVA-1.5 / 1.6 + SAM, training-free.

QAP asks LLaVA, per class, the paper's yes/no question and keeps the yes-classes and their
descriptions S1; TVR averages per-layer cosines between the image tokens and the class token of
S0 over layers l_s..l_e (D~), thresholds them dynamically (tau = min(alpha max D~, beta)) and
multiplies by the mean-thresholded top-K (by spatial entropy) S1 -> image attention (M_A); VGM
purifies the argmax guidance map with visual-encoder prototypes (M_r = M_v . M^_f); the
de-noised components of M_r give SAM positive points and one box; SAM's masks are merged.

Modules: ``qap`` (prompt, templates, S0/S1 and class-token bookkeeping), ``backbone`` (LLaVA by
hub id / local path / tiny config, tiny offline tokenizer), ``sam`` (SAM sizes, checkpoint
loading, decoding from a cached embedding), ``llava_pass`` (the extraction forwards),
``formulas`` (one function per symbol), ``prompts`` (geometry, de-noising, prompts, merging),
``pipeline`` (the knob side shared by decode and the reference), ``segmenter`` (extract /
decode), ``reference`` (the straight per-configuration pipeline: test oracle and naive bench).

The paper publishes no code; every choice it leaves open is a knob or a setting, listed with
its default in docs/fseg.md and in the module docstrings. The main ones:

- Presence: ``qa: auto`` (default) runs the paper's QAP (greedy decoding, ``max_new_tokens``)
  when extract gets no present classes (``settings.presence_source: model``, the search's
  default, and inference); given present classes (``image_labels`` / ``ground_truth``) are the
  yes-set, answer teacher-forced to ``yes, it contains a {c}. The {c} is the main object in
  this image.`` QAP depends on no knob: once per (image, class set), cached in the evidence.
- Layers: knobs ``l_s`` and ``l_span`` with l_e = l_s + l_span, so l_s > l_e cannot be sampled;
  ``layer_base`` 1 reads "layer l" as the output of block l.
- Multi-token class names: a map per sub-token, pooled by ``pool`` (mean by default).
- M_A: candidate maps are all L x H (layer, head) maps (``attn_layers: range`` for l_s..l_e),
  each averaged over the S1 queries, softmax over all keys; Kang et al.'s head guard
  (``image_mass: chord``: image-attention mass at least the elbow of all maps' masses;
  ``skip_layers``: not the first blocks) and the ``sink_row`` filter; ranked by ``entropy``
  (``area_mean`` paper form or ``mass_2mean``), mean of the K lowest. No S1 -> no M_A.
- F_v: the LLaVA vision layer it feeds its projector (penultimate, CLS dropped).
- SAM prompts: ``kernel_tokens`` / ``morph`` de-noising and ``min_area_tokens`` (sizes in
  LLaVA tokens, converted with the token's size in image pixels), ``max_points``, ``prompt``
  (points / box / both), ``multimask``; overlaps by ``merge`` (activation by default); pixels no
  mask covers are background (label 0) or, without a background class, the yes-class of
  highest D~. No yes-class at all: label 0 everywhere.
"""

from methods.fseg.segmenter import FSegSegmenter

SEGMENTER = FSegSegmenter

__all__ = ["SEGMENTER", "FSegSegmenter"]
