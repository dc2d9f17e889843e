"""``FSegSegmenter``: extract once per image (LLaVA + SAM encoder), decode per trial.

Evidence of one image (N grid tokens, L LLM blocks, H heads, Y yes-classes, S sub-tokens of
their names in all, Dv visual width; ``evidence_dtype`` (F_v only) float16 by default):

=================  ===========================  ============================================
``fv``             N x Dv, dtype                F_v on the grid (VGM prototypes)
``sam_embedding``  1 x C x h x w, float32       SAM image-encoder output (what its decoder reads)
``cos``            S x (L+1) x N, float32       cos(F^l(v_i), F^l(t)) per hidden state l
``attn``           Y x L x H x N, float32       S1 -> image attention, mean over S1 queries
``entropy``        V x Y x L x H, float32       spatial entropy of every map, per variant
=================  ===========================  ============================================

meta: image size, grid, view box, SAM input size, yes label values, sub-tokens per yes-class,
whether each has an S1, the QAP answers of every class (the model's, or the teacher-forced ones
under ``qa: present``), S0 fallbacks. For LLaVA-1.5-7B + SAM ViT-H with 3 yes-classes this is
about 6 MB. Decode runs no LLaVA and no SAM image encoder: only SAM's prompt encoder and mask
decoder on the cached embedding.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image
from methods.deferred import Deferred
from methods.fseg import formulas as fm
from methods.fseg.backbone import check_llava_spec, load_llava
from methods.fseg.llava_pass import ClassEvidence, PrefixRunner, encode_image
from methods.fseg.pipeline import (
    Geometry,
    attention_mask,
    check_params,
    fused_response,
    label_map,
    torch_threads,
)
from methods.fseg.qap import answer_tokens, canonical_answer, is_yes
from methods.fseg.sam import EmbeddingDecoder, image_embedding, load_sam

SETTINGS: dict[str, Any] = {
    "presence_source": "model", "seed": 0, "qa": "auto", "max_new_tokens": 96,
    "pad_to_square": True, "grid": "base",
    "vgm_features": "vision", "evidence_dtype": "float16", "dtype": "auto", "decode_threads": 1,
    "sam_memo": 256, "class_batch": 4,
}
SETTING_CHOICES: dict[str, tuple[Any, ...]] = {
    "presence_source": ("model", "image_labels", "ground_truth"),
    "qa": ("auto", "model", "present"), "grid": ("base", "highres"),
    "vgm_features": ("vision", "projector"), "evidence_dtype": ("float16", "float32"),
    "pad_to_square": (True, False),
}
#: Settings that change extract's output (seed too, for tiny random weights). presence_source
#: is read by the search (it decides whether extract gets ``present``); it is in the key so that
#: evidence extracted with the model's answers and with given labels never share an entry.
EXTRACT_SETTINGS = ("presence_source", "qa", "max_new_tokens", "pad_to_square", "grid",
                    "vgm_features", "evidence_dtype", "dtype")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
BACKBONE_KEYS = ("name", "arch", "model", "path", "template", "tiny", "sam", "sam_checkpoint",
                 "sam_random")
#: 2: attention maps and SAM embedding stored in float32 whatever evidence_dtype (1 stored
#: them in evidence_dtype: label maps differed from float32's; docs/fseg.md).
VERSION = 2


class FSegSegmenter(Segmenter):
    """FSeg-LLaVA (Zhang et al., CVPR 2026): LLaVA QAP + TVR + VGM, then SAM prompts."""

    method = "fseg"

    def __init__(self, llava: Any, sam: torch.nn.Module, backbone: Mapping[str, Any],
                 settings: Mapping[str, Any], device: str = "cpu"):
        from segment_anything import SamPredictor

        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise OvssError(f"fseg: unknown setting(s) {sorted(unknown)}; "
                            f"known: {sorted(SETTINGS)}")
        self.settings = {**SETTINGS, **settings}
        self._sam_memo: OrderedDict = OrderedDict()
        self._decoders: OrderedDict = OrderedDict()
        self.sam_memo_hits = 0
        for k, choices in SETTING_CHOICES.items():
            if self.settings[k] not in choices:
                raise OvssError(f"fseg: settings.{k} must be one of {list(choices)}, "
                                f"got {self.settings[k]!r}")
        if not isinstance(self.settings["class_batch"], int) or self.settings["class_batch"] < 1:
            raise OvssError(f"fseg: settings.class_batch must be an integer >= 1, "
                            f"got {self.settings['class_batch']!r}")
        # llava: the bundle, or a zero-argument builder called on first use (extract only):
        # a trial worker that decodes cached evidence never builds the LLM.
        self._llava, self.sam, self.device = llava, sam, device
        self.predictor = SamPredictor(sam)
        self.backbone = {k: backbone[k] for k in BACKBONE_KEYS if k in backbone}

    @classmethod
    def from_spec(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                  device: str = "cpu") -> FSegSegmenter:
        seed = int(settings.get("seed", 0))
        check_llava_spec(backbone)                     # cheap checks first: names, paths
        sam = load_sam(backbone, seed, device)         # (decode needs SAM's decoder)
        dtype = str(settings.get("dtype", "auto"))
        return cls(Deferred(lambda: load_llava(backbone, seed, dtype, device)), sam, backbone,
                   settings, device)

    @property
    def llava(self):
        """The LLaVA bundle, built on first use."""
        if isinstance(self._llava, Deferred):
            self._llava = self._llava.build()
        return self._llava

    @property
    def llava_built(self) -> bool:
        return not isinstance(self._llava, Deferred)

    def settings_key(self) -> dict[str, Any]:
        key = {k: self.settings[k] for k in EXTRACT_SETTINGS}
        if "tiny" in self.backbone or self.backbone.get("sam") == "tiny":
            key["seed"] = self.settings["seed"]
        return {"method": self.method, "version": VERSION, "backbone": self.backbone, **key}

    # --- extract -------------------------------------------------------------------------------
    def qa_mode(self, present: Sequence[int] | None) -> str:
        mode = self.settings["qa"]
        if mode == "auto":
            return "model" if present is None else "present"
        if mode == "present" and present is None:
            raise OvssError("fseg: settings.qa=present needs the image-level labels (present)")
        return mode

    def ask(self, runner: PrefixRunner, names: Mapping[int, str], mode: str,
            present: set[int]) -> dict[int, ClassEvidence]:
        """QAP for every class, then the TVR maps of the yes-classes (``class_batch`` per
        LLM pass)."""
        answers: dict[int, tuple[str, bool]] = {}
        for c, name in names.items():
            if mode == "model":
                text = runner.generate(name, int(self.settings["max_new_tokens"]))
                answers[c] = (text, is_yes(text))
            else:
                yes = c in present
                answers[c] = (canonical_answer(name) if yes else "No.", yes)
        yes_cls = [c for c in names if answers[c][1]]
        toks = {c: answer_tokens(self.llava.tokenizer, answers[c][0], names[c]) for c in yes_cls}
        maps = runner.analyse_many([(names[c], toks[c]) for c in yes_cls],
                                   int(self.settings["class_batch"]))
        out = {c: ClassEvidence(answers[c][0], False) for c in names}
        for c, (cos, attn) in zip(yes_cls, maps):
            out[c] = ClassEvidence(answers[c][0], True, cos, attn, bool(toks[c].s1_tokens),
                                   toks[c].fallback)
        return out

    @torch.no_grad()
    def extract(self, image: np.ndarray, classes: ClassSet,
                present: Sequence[int] | None = None) -> Evidence:
        """LLaVA vision once, the shared prefix once, QAP (+ TVR maps) per class, SAM encoder
        once. ``present``: label values of the classes given as present (image labels or ground
        truth), the yes-set under ``qa: present`` / ``auto``; None (``presence_source: model``):
        under ``auto`` the model answers every class (greedy, knob-independent) and its answers
        and yes-set are stored in the evidence's meta."""
        image = check_image(image)
        mode = self.qa_mode(present)
        s = self.settings
        tokens = encode_image(self.llava, image, bool(s["pad_to_square"]), s["grid"],
                              s["vgm_features"], self.device)
        runner = PrefixRunner(self.llava, tokens, self.device)
        wanted = {int(p) for p in (present or ())}
        per_class = self.ask(runner, {c: classes.prompts[c][0] for c in classes.foreground},
                             mode, wanted)
        del runner
        yes = [c for c in classes.foreground if per_class[c].yes]
        dtype = DTYPES[s["evidence_dtype"]]
        emb, input_size = image_embedding(self.predictor, image)
        self.predictor.reset_image()
        n, layers = tokens.positions.numel(), self.num_layers
        heads = self.num_heads
        if yes:
            cos = torch.cat([per_class[c].cos.transpose(0, 1) for c in yes]).contiguous()
            attn = torch.stack([per_class[c].attn for c in yes])
        else:
            cos, attn = torch.zeros(0, layers + 1, n), torch.zeros(0, layers, heads, n)
        entropy = fm.spatial_entropies(attn, tokens.grid)
        tensors = {"fv": tokens.fv.to(dtype).contiguous(),
                   "sam_embedding": emb.cpu().float().contiguous(),
                   "cos": cos.float(), "attn": attn.float().contiguous(),
                   "entropy": entropy.contiguous()}
        meta = {"background": classes.background, "num_classes": len(classes.names),
                "image_size": list(image.shape[:2]), "grid": list(tokens.grid),
                "view": list(tokens.view), "sam_input_size": input_size, "yes": yes,
                "n_sub": [per_class[c].cos.shape[1] for c in yes],
                "has_s1": [per_class[c].has_s1 for c in yes], "layers": layers,
                "answers": {str(c): per_class[c].answer for c in classes.foreground},
                "s0_fallbacks": sum(per_class[c].fallback for c in yes), "qa": mode}
        return Evidence(tensors, meta)

    def _decoder(self, emb_id: str, emb: torch.Tensor, input_size: list[int],
                 size: tuple[int, int]) -> EmbeddingDecoder:
        """The SAM decoder of one cached embedding (its image-side tensors computed once; the
        last few images are kept, about 14 MB each for a 64 x 64 x 256 embedding)."""
        key = (emb_id, tuple(input_size), size)
        if key not in self._decoders:
            self._decoders[key] = EmbeddingDecoder(self.predictor, emb, input_size, size)
            while len(self._decoders) > 4:
                self._decoders.popitem(last=False)
        self._decoders.move_to_end(key)
        return self._decoders[key]

    @property
    def num_layers(self) -> int:
        return int(self.llava.model.config.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.llava.model.config.text_config.num_attention_heads)

    # --- decode --------------------------------------------------------------------------------
    def decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        """HxW int64 label map from the cached maps (see pipeline.py for the steps), with
        ``settings.decode_threads`` torch threads."""
        with torch.no_grad(), torch_threads(int(self.settings["decode_threads"])):
            return self._decode(evidence, params)

    def _decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        meta, t = evidence.meta, evidence.tensors
        hs_idx, attn_idx = check_params(params, int(meta["layers"]))
        h, w = meta["image_size"]
        yes = [int(c) for c in meta["yes"]]
        if not yes:  # nothing answered yes: all background (label 0 without one)
            return np.zeros((h, w), dtype=np.int64)
        grid = tuple(meta["grid"])
        variant = fm.ENTROPY_VARIANTS.index(params["entropy"])
        cos = t["cos"][:, hs_idx]                                    # S x n_layers x N
        d_tilde, masks, off = [], [], 0
        for j, n_sub in enumerate(meta["n_sub"]):
            dt = fm.d_tilde(cos[off:off + n_sub].transpose(0, 1))    # n_sub x N
            d_tilde.append(fm.pool_subtokens(dt, params["pool"]))
            off += n_sub
            masks.append(attention_mask(t["attn"][j], t["entropy"][variant, j], attn_idx,
                                        params, grid) if meta["has_s1"][j] else None)
        d_tilde_maps = torch.stack(d_tilde)
        d_f_maps = fused_response(d_tilde_maps, masks, params)
        geo = Geometry((h, w), grid, tuple(meta["view"]))
        emb, input_size = t["sam_embedding"], meta["sam_input_size"]

        emb_id = hashlib.blake2b(emb.contiguous().view(torch.uint8).numpy().tobytes(),
                                 digest_size=16).hexdigest()

        def sam(points: np.ndarray | None, box: np.ndarray | None) -> tuple[np.ndarray, float]:
            # Trials with different knobs often end in the same prompts for a class: SAM's
            # decoder is deterministic, so equal inputs reuse its output (bounded LRU).
            key = (emb_id, tuple(input_size), (h, w), bool(params["multimask"]),
                   None if points is None else np.asarray(points, np.float64).tobytes(),
                   None if box is None else np.asarray(box, np.float64).tobytes())
            if key in self._sam_memo:
                self._sam_memo.move_to_end(key)
                self.sam_memo_hits += 1
                return self._sam_memo[key]
            out = self._decoder(emb_id, emb, input_size, (h, w))(points, box,
                                                                 bool(params["multimask"]))
            self._sam_memo[key] = out
            while len(self._sam_memo) > int(self.settings["sam_memo"]):
                self._sam_memo.popitem(last=False)
            return out

        return label_map(d_f_maps, d_tilde_maps, t["fv"].float(), yes,
                         bool(meta["background"]), geo, params, sam)
