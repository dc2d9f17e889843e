"""`pnp`: PnP-OVSS, training-free open-vocabulary segmentation from an off-the-shelf image-text
matching model (Luo, Khandelwal, Sigal, Li, "Emergent Open-Vocabulary Semantic Segmentation from
Off-the-shelf Vision-Language Models", CVPR 2024), with BLIP or BridgeTower through transformers.

Steps (poster / official code): (1) the classes present (image-level labels in a search, the
user's classes or a CLIP zero-shot filter at inference; the paper asks GPT-4o); (2) one prompt
"a picture of c1 ... cK", the text-to-image cross-attention of layer L, head H, word-piece mean per
class; (3) GradCAM: the attention times the clamped gradient of the ITM match logit; (4) Salience
DropOut: D passes, each on the image with the most salient patches blacked out, maps summed as
2 M0 + M1 + ...; (5) relative threshold T, Gaussian blur sigma, dense CRF, argmax.

Extract once, decode many: one forward + backward gives G for every layer and head, so the first
pass serves every (layer, head) trial (``extract``); the drop chain depends on (layer, head, D)
only (``extraction_knobs``, ``extend``); threshold, blur and CRF are decode-only.

Modules: ``backbone`` (loading, tiny configs, attention hooks), ``text`` (prompt and class token
rows), ``formulas`` (steps 2-4, one function per term), ``postprocess`` (step 5), ``presence``
(class-presence filters), ``segmenter`` (extract / extend / decode), ``reference`` (the straight
per-(layer, head) pipeline, ground truth for the tests and the naive baseline of the bench).
Choices where the paper is silent are listed in docs/pnp.md and in the module docstrings:

- layer and head are 1-based (the paper's L8 H10 = code indices 7 and 9); the last layer's
  class maps are 0 by construction (only the first text row reaches the ITM head), so the
  default space leaves it out.
- the prompt lists the present classes (``prompt_classes: present``) or every class with the
  present ones' maps picked out (``all``, the reference's search); ``prompt_names`` holds the
  reference's class names per data set (conf/methods/pnp.yaml ``datasets``).
- ITM text: BLIP's first token is replaced by ``[ENC]`` when the tokenizer has it (the original
  BLIP / LAVIS ITM; ``enc_token: false`` keeps ``[CLS]`` as transformers' examples do).
- drop rule: ``top_k`` (k = 10, the reference code), ``halving`` (first release) or ``above``
  (a min-max threshold on U); dropped pixels take the mean colour (0 after normalisation, the
  reference) or black; the dropped set is shared by all classes.
- The drop chain is computed for drop_iters - 1 passes after the first (D = 4: 0/10/20/30 patches
  dropped); the selection after the last pass is not computed.
- Post-processing at the image size, scaled down to ``work_max_side`` (512) when larger; the
  label map is resized (nearest) to the image size.
- No per-dataset "K < 3" background rule: a class set with background always has the
  background channel, one without never does.
"""

from methods.pnp.segmenter import PnPSegmenter

SEGMENTER = PnPSegmenter

__all__ = ["SEGMENTER", "PnPSegmenter"]
