"""``ClipSegSegmenter``: extract once per image (one ViT pass per window), decode per trial.

Evidence of one image (A x B windows of T = 1 + P tokens, width D, L blocks, K = 4 DSI terms;
``evidence_dtype`` float16 by default, checked below 1e-3 relative error in the tests):

==================  ===========================  ==========================================
``key_gram``        L x W x T(T+1)/2, dtype      upper triangle of k_l k_l^T, every block l
``qk_attention``    W x P x T, dtype             final block's head-averaged q-k attention
``values``          K x W x T x D, dtype         V (DSI) for dsi_start = -1..-K, times W_o^T
``rows``, ``cols``  H x A gh, W x B gw, float32  separable window upsampling (windows.py)
``text``            names x E, float32           template-averaged name embeddings
==================  ===========================  ==========================================

For ViT-B/16 at short side 448 (a 4:3 image: 15 windows) this is about 26 MB. Decode builds
Attn (Eq. 3 with G), V (DSI), Z (Eq. 2), then ln_post / proj, cosine with the texts, the window
mosaic upsampling, softmax(logit_scale * cos) over all names, max over each class's names, and
the background threshold; it reads ln_post, proj and the out_proj bias from the segmenter and
runs no transformer block.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from methods.base import ClassSet, Evidence, OvssError, Segmenter, check_image
from methods.clipseg.backbone import TEMPLATES, load_clip, name_embeddings
from methods.clipseg.formulas import (
    coherence_residual_attention,
    dense_output,
    integrated_value,
    relation_attention,
)
from methods.clipseg.vit import window_pass
from methods.clipseg.windows import (
    mosaic,
    resize_image,
    resized_size,
    separable_upsampling,
    window_batch,
    window_grid,
)

VARIANTS = ("qk", "kk_last", "kk_mid", "cra")
DSI_TERMS = 4
SETTINGS: dict[str, Any] = {
    "seed": 0, "short_side": 448, "window": 224, "stride": 112, "logit_scale": 40.0,
    "templates": "imagenet80", "evidence_dtype": "float16", "chunk": 16,
}
#: Settings that change extract's output (the rest only change decode).
EXTRACT_SETTINGS = ("short_side", "window", "stride", "templates", "evidence_dtype")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
VERSION = 1


@functools.lru_cache(maxsize=8)
def _triu(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    iu = torch.triu_indices(t, t)
    return iu[0], iu[1]


@functools.lru_cache(maxsize=8)
def _unpack_index(t: int) -> torch.Tensor:
    """T*T indices into the packed upper triangle: entry (i, j) -> position of (min, max)."""
    pos = torch.empty(t, t, dtype=torch.long)
    r, c = _triu(t)
    pos[r, c] = torch.arange(len(r))
    pos[c, r] = torch.arange(len(r))
    return pos.flatten()


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """... x T x T symmetric -> ... x T(T+1)/2 (upper triangle, row-major)."""
    r, c = _triu(m.shape[-1])
    return m[..., r, c]


def unpack_symmetric(p: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`pack_symmetric`: ... x T(T+1)/2 -> ... x T x T float32."""
    return p.float().index_select(-1, _unpack_index(t)).unflatten(-1, (t, t))


class ClipSegSegmenter(Segmenter):
    """CLIP CRA + DSI (Liu et al., AAAI 2025) on an open_clip ViT."""

    method = "clipseg"

    def __init__(self, model: torch.nn.Module, model_name: str, backbone: Mapping[str, Any],
                 settings: Mapping[str, Any], device: str = "cpu"):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise OvssError(f"clipseg: unknown setting(s) {sorted(unknown)}; "
                            f"known: {sorted(SETTINGS)}")
        self.settings = {**SETTINGS, **settings}
        if self.settings["evidence_dtype"] not in DTYPES:
            raise OvssError(f"clipseg: evidence_dtype must be one of {sorted(DTYPES)}")
        if self.settings["templates"] not in TEMPLATES:
            raise OvssError(f"clipseg: templates must be one of {sorted(TEMPLATES)}")
        self.model, self.model_name, self.device = model, model_name, device
        self.backbone = {k: backbone[k] for k in ("name", "model", "pretrained", "path", "tiny")
                         if k in backbone}
        self.tokenizer = open_clip.get_tokenizer(model_name)
        visual = model.visual
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        if self.num_layers < DSI_TERMS:
            raise OvssError(f"clipseg: the ViT needs at least {DSI_TERMS} blocks for DSI, "
                            f"{model_name} has {self.num_layers}")
        self.patch = int(visual.patch_size[0])
        final = visual.transformer.resblocks[-1].attn
        # Parameters decode needs (held here, not in the per-image evidence).
        self.out_bias = (final.out_proj.bias.detach().float().cpu()
                         if final.out_proj.bias is not None else None)
        self.ln_post = copy.deepcopy(visual.ln_post).float().cpu()
        self.proj = visual.proj.detach().float().cpu()
        self.mean = torch.tensor(visual.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(visual.image_std, dtype=torch.float32).view(3, 1, 1)
        self._text: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                  device: str = "cpu") -> ClipSegSegmenter:
        model, name = load_clip(backbone, int(settings.get("seed", 0)), device)
        return cls(model, name, backbone, settings, device)

    def settings_key(self) -> dict[str, Any]:
        key = {k: self.settings[k] for k in EXTRACT_SETTINGS}
        if "tiny" in self.backbone:
            key["seed"] = self.settings["seed"]
        return {"method": self.method, "version": VERSION, "backbone": self.backbone, **key}

    # --- text ----------------------------------------------------------------------------------
    @staticmethod
    def class_names(classes: ClassSet) -> tuple[list[str], list[int]]:
        """The names to embed (every synonym of every foreground class) and, per name, its
        foreground index (label value minus 1 when the class set has a background)."""
        names, owner = [], []
        for j, c in enumerate(classes.foreground):
            for p in classes.prompts[c]:
                names.append(p)
                owner.append(j)
        return names, owner

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """names x E float32, memoised per (names, templates): they depend on nothing else."""
        key = (tuple(names), self.settings["templates"])
        if key not in self._text:
            self._text[key] = name_embeddings(self.model, self.tokenizer, names,
                                              self.settings["templates"])
        return self._text[key]

    # --- extract -------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> normalised 3 x H' x W' float32 (short side resized)."""
        size = resized_size(*image.shape[:2], int(self.settings["short_side"]))
        img = torch.from_numpy(np.ascontiguousarray(resize_image(image, size)))
        return (img.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    @torch.no_grad()
    def extract(self, image: np.ndarray, classes: ClassSet,
                present: Sequence[int] | None = None) -> Evidence:
        """One ViT pass per window; ``present`` is not used (no presence rule in this method)."""
        image = check_image(image)
        pixels = self.preprocess(image)
        grid = window_grid(tuple(pixels.shape[1:]), int(self.settings["window"]),
                           int(self.settings["stride"]), self.patch)
        windows = window_batch(pixels, grid)
        dtype = DTYPES[self.settings["evidence_dtype"]]
        parts = []
        chunk = max(1, int(self.settings["chunk"]))
        for i in range(0, len(windows), chunk):
            ev = window_pass(self.visual, windows[i:i + chunk].to(self.device), DSI_TERMS)
            values = torch.stack([integrated_value(ev.values, -n)   # V for dsi_start = -n
                                  for n in range(1, DSI_TERMS + 1)])
            parts.append((pack_symmetric(ev.grams).to(dtype).cpu(), ev.qk.to(dtype).cpu(),
                          values.to(dtype).cpu()))
        rows, cols = separable_upsampling(grid, image.shape[:2])
        names, owner = self.class_names(classes)
        tensors = {
            "key_gram": torch.cat([p[0] for p in parts], 1).contiguous(),
            "qk_attention": torch.cat([p[1] for p in parts], 0).contiguous(),
            "values": torch.cat([p[2] for p in parts], 1).contiguous(),
            "rows": rows, "cols": cols, "text": self.text_embeddings(names).clone(),
        }
        meta = {"background": classes.background, "num_classes": len(classes.names),
                "name_class": owner, "image_size": list(image.shape[:2]),
                "grid": [len(grid.ys), len(grid.xs), grid.gh, grid.gw],
                "tokens": 1 + grid.gh * grid.gw, "layers": self.num_layers}
        return Evidence(tensors, meta)

    # --- decode --------------------------------------------------------------------------------
    def check_params(self, params: Mapping[str, Any], layers: int) -> None:
        variant = params["attention"]
        if variant not in VARIANTS:
            raise OvssError(f"clipseg: attention must be one of {VARIANTS}, got {variant!r}")
        if variant in ("kk_mid", "cra") and not 1 <= int(params["layer"]) <= layers - 1:
            raise OvssError(f"clipseg: layer must be in 1..{layers - 1} (1-based block index), "
                            f"got {params['layer']}")
        if not -DSI_TERMS <= int(params["dsi_start"]) <= -1:
            raise OvssError(f"clipseg: dsi_start must be in -{DSI_TERMS}..-1, "
                            f"got {params['dsi_start']}")

    def attention_probs(self, ev: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """softmax(Attn) for the patch rows: W x P x T float32 (Eq. 3 and the variants)."""
        variant = params["attention"]
        if variant == "qk":
            return ev.tensors["qk_attention"].float()
        layers, t = int(ev.meta["layers"]), int(ev.meta["tokens"])
        layer = layers if variant == "kk_last" else int(params["layer"])
        gram = unpack_symmetric(ev.tensors["key_gram"][layer - 1], t)[:, 1:]   # W x P x T
        relation = None
        if variant == "cra":
            g = relation_attention(gram[:, :, 1:], float(params["epsilon"]),
                                   int(params["min_pts"]))
            relation = F.pad(g, (1, 0))                  # the class token column: no relation
        return torch.softmax(coherence_residual_attention(gram, float(params["tau"]), relation),
                             dim=-1)

    def scaled_logits(self, evidence: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """``logit_scale * cos`` of every name at the original image size: H x names x W
        float32 (this layout makes both upsampling products plain matrix products)."""
        meta = evidence.meta
        self.check_params(params, int(meta["layers"]))
        attn = self.attention_probs(evidence, params)
        value = evidence.tensors["values"][-int(params["dsi_start"]) - 1]   # DSI's V, Eq. 4
        z = dense_output(attn, value, out_bias=self.out_bias, probabilities=True)
        feats = F.normalize(self.ln_post(z) @ self.proj, dim=-1)          # W x P x E
        text = evidence.tensors["text"].float() * float(self.settings["logit_scale"])
        x = mosaic(feats @ text.T, *meta["grid"])                          # names x Agh x Bgw
        return upsample(x, evidence.tensors["rows"], evidence.tensors["cols"])

    @torch.no_grad()
    def decode_probs(self, evidence: Evidence, params: Mapping[str, Any]) -> torch.Tensor:
        """Per-class probabilities at the original image size: C_fg x H x W float32
        (C_fg = foreground classes; max over each class's names of the softmax over names)."""
        probs = torch.softmax(self.scaled_logits(evidence, params), dim=1).permute(1, 0, 2)
        return names_to_classes(probs, evidence.meta["name_class"])

    @torch.no_grad()
    def decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        """HxW int64 label map: the class of the best name; with a background class, pixels
        whose best class probability is below ``bg_threshold`` are background (0).

        Same result as ``probs_to_labels(decode_probs(...))`` without the full softmax: the best
        class probability is the best name's, ``1 / sum_n exp(l_n - l_max)``.
        """
        logits = self.scaled_logits(evidence, params)                      # H x names x W
        best, arg = logits.max(1)
        label = torch.as_tensor(evidence.meta["name_class"], dtype=torch.long)[arg]
        if evidence.meta["background"]:
            # best probability < threshold  <=>  sum_n exp(l_n - l_max) > 1 / threshold
            mass = logits.sub_(best[:, None]).exp_().sum(1)
            label = (label + 1).masked_fill_(mass * float(params["bg_threshold"]) > 1.0, 0)
        return label.numpy().astype(np.int64)


def upsample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """names x (A gh) x (B gw) mosaic -> H x names x W: ``rows @ x_c @ cols^T`` for every name
    as two matrix products, the cheaper order first."""
    c, a, b = x.shape
    h, w = rows.shape[0], cols.shape[0]
    if h * b * (a + w) <= a * w * (b + h):
        y = (rows @ x.transpose(0, 1).reshape(a, c * b)).view(h * c, b)      # (H names) x b
        return (y @ cols.T).view(h, c, w)
    y = (x.reshape(c * a, b) @ cols.T).view(c, a, w).transpose(0, 1).reshape(a, c * w)
    return (rows @ y).view(h, c, w)


def names_to_classes(probs: torch.Tensor, name_class: Sequence[int]) -> torch.Tensor:
    """names x H x W probabilities -> classes x H x W, the max over each class's names."""
    owner = list(name_class)
    n_cls = max(owner) + 1
    if n_cls == len(owner):
        return probs
    rows = [[i for i, o in enumerate(owner) if o == c] for c in range(n_cls)]
    return torch.stack([probs[r[0]] if len(r) == 1 else probs[r].amax(0) for r in rows])


def probs_to_labels(probs: torch.Tensor, background: bool, threshold: float) -> np.ndarray:
    """C_fg x H x W -> H x W int64 label values (foreground j is label j + 1 with background)."""
    top, arg = probs.max(0)
    if not background:
        return arg.numpy().astype(np.int64)
    label = arg + 1
    label[top < threshold] = 0
    return label.numpy().astype(np.int64)

