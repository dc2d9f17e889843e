"""The two image-text matching (ITM) models of PnP-OVSS, loaded through transformers.

A backbone entry of ``conf/methods/pnp.yaml`` has

- ``arch``: ``blip`` (``BlipForImageTextRetrieval``: a ViT image encoder, a BERT text encoder
  with cross-attention to the image in every layer, the ITM head on the first text token) or
  ``bridgetower`` (``BridgeTowerForImageAndTextRetrieval``: the text-to-image cross-attention
  of the cross-modal ``cross_modal_text_layers``, the ITM head on the pooled features);
- ``model``: a hub id, or ``path``: a local directory that overrides it; model, tokenizer and
  image processor (for the normalisation mean/std) are read with ``from_pretrained``, the model
  with ``attn_implementation="eager"`` (sdpa returns no attention maps), no
  ``trust_remote_code``. Missing weights -> OvssError naming the id / path;
- ``tiny: {...}``: the same classes from a tiny config with random weights seeded by
  ``settings.seed`` and an offline tokenizer (tests and ``--preset smoke``).

:class:`VisionLanguageModel` hands back exactly what PnP needs: the ITM "match" logit and the
text-to-image cross-attention probabilities of chosen layers, caught by forward hooks on the
cross-attention modules (one place, no patched model code). The model is frozen; only the
cross-attention query weights keep ``requires_grad`` so that every attention map and all that
follows it is recorded by autograd, while the vision tower (which does not depend on them) is not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.base import OvssError

ARCHS = ("blip", "bridgetower")
#: CLIP normalisation, used by BLIP and BridgeTower (and by the reference code's preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Fields of a ``tiny:`` block: both towers ``layers`` deep, ``width`` wide, ``heads`` heads.
TINY_DEFAULTS: dict[str, int] = {"width": 32, "layers": 2, "heads": 2, "image_size": 64,
                                 "patch_size": 16, "intermediate": 64}
TINY_WORDS = (
    "a picture of aeroplane bicycle bird boat bottle bus car cat chair cow dog horse person sheep "
    "sofa train background table plant monitor"
)
#: Initialiser std of the tiny vision towers (see ``tiny_config``).
TINY_INIT_STD = 0.2
#: Word pieces so that some class names split into several tokens (word-piece mean tested).
TINY_PIECES = ("potted", "##plant", "tv", "##monitor", "dining", "##table", "motor", "##bike")


@dataclass
class VisionLanguageModel:
    """A loaded ITM model, frozen, in eval mode.

    arch:        ``blip`` or ``bridgetower``.
    tokenizer:   a transformers tokenizer (``build_inputs_with_special_tokens`` is used).
    mean, std:   per-channel normalisation of RGB in [0, 1].
    patch:       ViT patch size in pixels; native_size: the image size of the position table.
    layers, heads: number of cross-attention layers and heads per layer.
    enc_token_id: BLIP's ``[ENC]`` id put in place of the first token for ITM (None: keep it).
    """

    model: torch.nn.Module
    tokenizer: Any
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch: int
    native_size: int
    layers: int
    heads: int
    enc_token_id: int | None = None

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        for m in self.cross_attention_modules():
            m.query.weight.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def cross_attention_modules(self) -> list[torch.nn.Module]:
        """The modules whose second output is the text-to-image attention ``[B, H, T, 1+P²]``."""
        if self.arch == "blip":
            layers = self.model.text_encoder.encoder.layer
        else:
            layers = self.model.bridgetower.cross_modal_text_layers
        return [layer.crossattention.self for layer in layers]

    def match_logit(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """The raw ITM "match" logit ``s = itm_head(.)[:, 1]``: ``[B]`` float32.

        pixels: ``[B, 3, S, S]`` normalised; input_ids / attention_mask: ``[B, T]`` int64.
        The position embeddings are interpolated (bicubic) when S differs from the native size.
        """
        interp = pixels.shape[-1] != self.native_size
        if self.arch == "blip":
            m = self.model
            image = m.vision_model(pixel_values=pixels,
                                   interpolate_pos_encoding=interp).last_hidden_state
            image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
            text = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  encoder_hidden_states=image,
                                  encoder_attention_mask=image_mask, return_dict=True)
            return m.itm_head(text.last_hidden_state[:, 0, :])[:, 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=pixels, interpolate_pos_encoding=interp)
        return out.logits[:, 1]

    @contextmanager
    def catch_attention(self, layers: Sequence[int], on_catch: Callable | None = None):
        """Within the block, ``caught[l]`` is the cross-attention of 0-based layer ``l``
        (``[B, H, T, 1+P²]`` float32, post-softmax); ``on_catch(l, tensor)`` is called too."""
        caught: dict[int, torch.Tensor] = {}
        mods = self.cross_attention_modules()
        handles = []
        for li in layers:
            def hook(_m, _args, out, li=li):
                caught[li] = out[1]
                if on_catch is not None:
                    on_catch(li, out[1])
            handles.append(mods[li].register_forward_hook(hook))
        try:
            yield caught
        finally:
            for h in handles:
                h.remove()


# --- tiny models ---------------------------------------------------------------------------------
def tiny_tokenizer(arch: str) -> Any:
    """An offline word-piece ``PreTrainedTokenizerFast``: the VOC words, "a picture of", a few
    multi-piece words (:data:`TINY_PIECES`) and every letter (as a word and as a ``##`` piece),
    so no word is unknown. BERT-style specials for BLIP (with ``[DEC]`` / ``[ENC]``),
    RoBERTa-style ``<s> ... </s>`` for BridgeTower."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    words = sorted(set(TINY_WORDS.split()) | set(TINY_PIECES) | set(letters)
                   | {"##" + c for c in letters} | set("'.,;:?!/-"))
    if arch == "blip":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
        bos, eos, pad, unk = "[CLS]", "[SEP]", "[PAD]", "[UNK]"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        bos, eos, pad, unk = "<s>", "</s>", "<pad>", "<unk>"
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    extra = {"cls_token": bos, "sep_token": eos} if arch == "blip" else {"bos_token": bos}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad,
                                   eos_token=eos, **extra)


def tiny_config(arch: str, c: Mapping[str, int], vocab: int, tok: Any) -> Any:
    from transformers import BlipConfig, BridgeTowerConfig

    w, n, h, ff = c["width"], c["layers"], c["heads"], c["intermediate"]
    # BlipVisionConfig initialises with std 1e-10 (the released weights replace it): random
    # weights that small leave the image almost without effect on the maps (the drop fill, the
    # pixels). TINY_INIT_STD (BERT's 0.02 is too small at width 32) makes the image matter;
    # tests/test_pnp.py checks that it does.
    vision = {"hidden_size": w, "num_hidden_layers": n, "num_attention_heads": h,
              "intermediate_size": ff, "image_size": c["image_size"], "patch_size": c["patch_size"],
              "initializer_range": TINY_INIT_STD}
    text = {"hidden_size": w, "num_hidden_layers": n, "num_attention_heads": h,
            "intermediate_size": ff, "vocab_size": vocab, "max_position_embeddings": 128,
            "pad_token_id": tok.pad_token_id}
    if arch == "blip":
        return BlipConfig(text_config={**text, "encoder_hidden_size": w,
                                       "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
                                       "sep_token_id": tok.sep_token_id},
                          vision_config=vision, projection_dim=w, image_text_hidden_size=w)
    # BridgeTower's CLIP tower has hidden_size // 64 heads: give it one 64-wide head at least.
    vision.pop("num_attention_heads")
    vision.pop("intermediate_size")
    vision["hidden_size"] = max(64, w)
    return BridgeTowerConfig(hidden_size=w, num_hidden_layers=n, num_attention_heads=h,
                             text_config={**text, "bos_token_id": tok.bos_token_id,
                                          "eos_token_id": tok.eos_token_id},
                             vision_config=vision)


def random_model(arch: str, config: Any, tokenizer: Any, seed: int,
                 device: str = "cpu") -> VisionLanguageModel:
    """The real model class of ``arch`` built from ``config`` with random weights (seeded)."""
    from transformers import BlipForImageTextRetrieval, BridgeTowerForImageAndTextRetrieval

    config._attn_implementation = "eager"
    cls = BlipForImageTextRetrieval if arch == "blip" else BridgeTowerForImageAndTextRetrieval
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = cls(config)
    return wrap(model.to(device), tokenizer, arch)


def wrap(model: torch.nn.Module, tokenizer: Any, arch: str,
         mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> VisionLanguageModel:
    cfg = model.config
    vision = cfg.vision_config
    if arch == "blip":
        layers, heads = cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads
    else:
        layers, heads = cfg.num_hidden_layers, cfg.text_config.num_attention_heads
    enc = None
    if arch == "blip":
        enc_id = tokenizer.convert_tokens_to_ids("[ENC]")
        if isinstance(enc_id, int) and enc_id != tokenizer.unk_token_id:
            enc = enc_id
    return VisionLanguageModel(model, tokenizer, arch, tuple(mean), tuple(std),
                               int(vision.patch_size), int(vision.image_size), int(layers),
                               int(heads), enc)


def check_vlm_spec(backbone: Mapping[str, Any]) -> int | None:
    """The checks of a backbone entry that need no weights (arch, tiny fields, the local
    directory, the hub id), as the same one-line errors :func:`load_vlm` gives; returns the
    ViT patch size when the entry fixes it without a model (``tiny``), else None."""
    label = backbone.get("name", "?")
    arch = backbone.get("arch")
    if arch not in ARCHS:
        raise OvssError(f"pnp backbone {label!r}: arch must be one of {ARCHS}, got {arch!r}")
    if backbone.get("tiny") is not None:
        if backbone.get("path"):   # a tiny entry builds random weights: a path would be ignored
            raise OvssError(f"pnp backbone {label!r}: a `tiny` entry builds random weights and "
                            f"cannot load `path` {backbone['path']}; give a backbone with `arch` "
                            f"and `path` (no `tiny`) for a local model")
        return int(_tiny_fields(backbone["tiny"])["patch_size"])
    path = backbone.get("path")
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_dir():
            raise OvssError(f"pnp backbone {label!r}: model directory {p} not found")
        return None
    source = backbone.get("model")
    if not source or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise OvssError(f"pnp backbone {label!r}: give `model` (a hub id such as "
                        f"Salesforce/blip-itm-large-flickr) or `path` (a local directory)")
    return None


def _tiny_fields(tiny: Mapping[str, Any] | None) -> dict[str, int]:
    tiny = dict(tiny or {})
    unknown = set(tiny) - set(TINY_DEFAULTS)
    if unknown:
        raise OvssError(f"pnp tiny backbone: unknown field(s) {sorted(unknown)}; "
                        f"known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **{k: int(v) for k, v in tiny.items()}}
    if c["width"] % c["heads"] or c["image_size"] % c["patch_size"]:
        raise OvssError(f"pnp tiny backbone: width must divide by heads and image_size by "
                        f"patch_size, got {c}")
    return c


def load_vlm(backbone: Mapping[str, Any], seed: int, device: str = "cpu") -> VisionLanguageModel:
    """The ITM model of a backbone entry (see the module docstring)."""
    check_vlm_spec(backbone)
    arch = backbone["arch"]
    if backbone.get("tiny") is not None:
        c = _tiny_fields(backbone["tiny"])
        tok = tiny_tokenizer(arch)
        return random_model(arch, tiny_config(arch, c, len(tok), tok), tok, seed, device)
    return _load_pretrained(arch, backbone, backbone.get("name", "?"), device)


def _load_pretrained(arch: str, backbone: Mapping[str, Any], label: str,
                     device: str) -> VisionLanguageModel:
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        BlipForImageTextRetrieval,
        BridgeTowerForImageAndTextRetrieval,
    )

    path = backbone.get("path")     # checked by check_vlm_spec
    source = str(Path(str(path)).expanduser()) if path else str(backbone["model"])
    cls = BlipForImageTextRetrieval if arch == "blip" else BridgeTowerForImageAndTextRetrieval
    from methods.io import pretrained_kwargs, weights_error

    kw = pretrained_kwargs(backbone)  # safetensors only unless allow_pickle_weights; revision
    rev = {"revision": kw["revision"]} if "revision" in kw else {}
    try:
        model = cls.from_pretrained(source, attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise weights_error(f"pnp backbone {label!r}", source, e, kw) from None
    try:
        tok = AutoTokenizer.from_pretrained(source, **rev)
    except (OSError, ValueError) as e:
        raise OvssError(f"pnp backbone {label!r}: cannot load {source!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        f"set backbone.path=<local directory>") from None
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        proc = AutoImageProcessor.from_pretrained(source, **rev)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        pass  # no preprocessor config: both models were trained with the CLIP statistics
    return wrap(model.to(device), tok, arch, mean, std)
