"""Loading LLaVA (1.5 / 1.6) through transformers: hub id, local path, or a tiny random config.

A backbone entry of ``conf/methods/fseg.yaml`` names the LLaVA part with

- ``arch``: ``llava`` (LLaVA-1.5, ``LlavaForConditionalGeneration``) or ``llava_next``
  (LLaVA-1.6, ``LlavaNextForConditionalGeneration``);
- ``model``: a hub id (``llava-hf/llava-1.5-7b-hf``), or ``path``: a local directory that
  overrides it (model, tokenizer and image processor are read from it with ``from_pretrained``;
  no ``trust_remote_code``), loaded with eager attention (sdpa returns no attention maps);
- ``tiny: {...}``: the same classes built from a tiny config with random weights seeded by
  ``settings.seed`` (tests and ``--preset smoke``).

The tiny tokenizer is built offline: a word-level ``tokenizers`` model (lower-casing, split on
whitespace and punctuation, ``<s>`` prepended) whose vocabulary is the words of the chat
template, the QAP question, the canonical answer and description, "yes"/"no", the Pascal VOC
class words and punctuation; any other word becomes ``<unk>`` (offsets still locate it). It is
wrapped in ``PreTrainedTokenizerFast`` so offsets, decode and special tokens behave as a real
fast tokenizer's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.base import OvssError
from methods.fseg.qap import CANONICAL_DESCRIPTION, QUESTION, TEMPLATES

ARCHS = ("llava", "llava_next")
#: The transformers versions this code runs on (pyproject.toml): ``cache=`` / ``out.cache`` (the
#: KV-cache names since 5.24; ``past_key_values`` is deprecated there, removal announced for
#: 5.40) and ``mm_encoder_outputs``. Older versions swallow ``cache=`` into ``**kwargs``, so the
#: cached question pass would run without the prefix (and the image): ``check_api`` refuses them.
TRANSFORMERS_RANGE = ">=5.24,<6"


def check_api(model: torch.nn.Module) -> None:
    """OvssError unless ``model.forward`` takes the ``cache`` and ``mm_encoder_outputs``
    keywords by name (an unknown keyword would be swallowed by ``**kwargs`` without a word)."""
    import inspect

    import transformers

    params = inspect.signature(model.forward).parameters
    missing = [k for k in ("cache", "mm_encoder_outputs") if k not in params]
    if missing:
        raise OvssError(f"fseg: {type(model).__name__}.forward has no {missing} argument "
                        f"(transformers {transformers.__version__}; fseg needs transformers"
                        f"{TRANSFORMERS_RANGE})")
#: Fields of a ``tiny:`` block and their defaults (a 64 px CLIP tower, patch 8: 8x8 tokens).
TINY_DEFAULTS: dict[str, Any] = {
    "arch": "llava", "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
    "image_size": 64, "patch_size": 8, "width": 32, "layers": 4, "heads": 4, "kv_heads": 2,
    "intermediate": 64, "vision_intermediate": 64, "vocab_size": 0,
}
TINY_WORDS = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow dining table dog horse motorbike "
    "person potted plant sheep sofa train tv monitor background yes no it contains a an the this "
    "image object"
)


@dataclass
class Llava:
    """A loaded LLaVA: model (eval, eager attention), tokenizer, image processor and identity."""

    model: torch.nn.Module
    tokenizer: Any
    image_processor: Any
    arch: str
    template: str
    image_token_id: int
    dtype: torch.dtype


def tiny_tokenizer(extra_words: str = "") -> Any:
    """A word-level ``PreTrainedTokenizerFast`` built offline (see the module docstring)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = " ".join([*TEMPLATES.values(), QUESTION, CANONICAL_DESCRIPTION, TINY_WORDS,
                     extra_words, "'.,;:?!/"])
    words = sorted({w for w in re.findall(r"\w+|[^\w\s]", text.lower()) if w != "c_name"})
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])


def _tiny_llava(tiny: Mapping[str, Any], seed: int) -> Llava:
    """The real LLaVA classes from a small config (``tiny:`` fields over TINY_DEFAULTS; any
    size, e.g. real-width Llama blocks for the benchmark), random weights seeded by ``seed``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
    )

    unknown = set(tiny) - set(TINY_DEFAULTS)
    if unknown:
        raise OvssError(f"fseg tiny backbone: unknown field(s) {sorted(unknown)}; "
                        f"known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **tiny}
    if c["arch"] not in ARCHS:
        raise OvssError(f"fseg tiny backbone: arch must be one of {ARCHS}, got {c['arch']!r}")
    tok = tiny_tokenizer()
    image_token = tok.convert_tokens_to_ids("<image>")
    s = int(c["image_size"])
    vision = CLIPVisionConfig(hidden_size=c["vision_width"],
                              intermediate_size=c["vision_intermediate"],
                              num_hidden_layers=c["vision_layers"],
                              num_attention_heads=c["vision_heads"], image_size=s,
                              patch_size=c["patch_size"])
    text = LlamaConfig(hidden_size=c["width"], intermediate_size=c["intermediate"],
                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                       num_key_value_heads=c["kv_heads"],
                       vocab_size=max(len(tok), int(c["vocab_size"])),
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = {"vision_config": vision, "text_config": text, "image_token_index": image_token,
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    size = {"shortest_edge": s}
    crop = {"height": s, "width": s}
    torch.manual_seed(seed)
    if c["arch"] == "llava":
        cfg = LlavaConfig(**common)
        cfg._attn_implementation = "eager"
        model = LlavaForConditionalGeneration(cfg)
        proc = CLIPImageProcessor(size=size, crop_size=crop)
    else:
        pins = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        cfg = LlavaNextConfig(**common, image_grid_pinpoints=pins)
        cfg._attn_implementation = "eager"
        model = LlavaNextForConditionalGeneration(cfg)
        proc = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pins)
    return Llava(model.eval(), tok, proc, c["arch"], "llava_v1", image_token, torch.float32)


def model_dtype(name: str, device: str) -> torch.dtype:
    """``settings.dtype``: ``auto`` is float16 on CUDA, float32 elsewhere."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in table:
        raise OvssError(f"fseg: settings.dtype must be auto or one of {sorted(table)}, "
                        f"got {name!r}")
    return table[name]


def check_llava_spec(backbone: Mapping[str, Any]) -> None:
    """The checks of :func:`load_llava` that need no weights (arch, source, template, a local
    path that exists): one-line OvssError before anything is built."""
    if "tiny" in backbone:
        return
    name = backbone.get("name")
    if backbone.get("arch") not in ARCHS:
        raise OvssError(f"fseg backbone {name!r}: arch must be one of {ARCHS}, "
                        f"got {backbone.get('arch')!r}")
    source = backbone.get("path") or backbone.get("model")
    if not source:
        raise OvssError(f"fseg backbone {name!r}: give `model` (hub id) or `path`")
    if backbone.get("path"):
        local = Path(str(backbone["path"])).expanduser()
        if not local.exists():
            raise OvssError(f"fseg backbone {name!r}: LLaVA path {local} not found")
        if local.is_dir() and not (local / "config.json").is_file():
            raise OvssError(f"fseg backbone {name!r}: LLaVA path {local} has no config.json "
                            "(not a transformers model directory)")
    if backbone.get("template", "llava_v1") not in TEMPLATES:
        raise OvssError(f"fseg backbone {name!r}: template must be one of "
                        f"{sorted(TEMPLATES)}, got {backbone.get('template')!r}")


def load_llava(backbone: Mapping[str, Any], seed: int, dtype: str, device: str) -> Llava:
    """The LLaVA of a backbone entry (see the module docstring), in eval mode on ``device``."""
    if "tiny" in backbone:   # built in float32, then in settings.dtype as a checkpoint loads
        out = _tiny_llava(backbone.get("tiny") or {}, seed)
        check_api(out.model)
        out.dtype = model_dtype(dtype, device)
        out.model.to(device, out.dtype)
        return out
    arch = backbone.get("arch")
    if arch not in ARCHS:
        raise OvssError(f"fseg backbone {backbone.get('name')!r}: arch must be one of {ARCHS}, "
                        f"got {arch!r}")
    source = backbone.get("path") or backbone.get("model")
    if not source:
        raise OvssError(f"fseg backbone {backbone.get('name')!r}: give `model` (hub id) or `path`")
    template = backbone.get("template", "llava_v1")
    if template not in TEMPLATES:
        raise OvssError(f"fseg backbone {backbone.get('name')!r}: template must be one of "
                        f"{sorted(TEMPLATES)}, got {template!r}")
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    cls = LlavaForConditionalGeneration if arch == "llava" else LlavaNextForConditionalGeneration
    check_api(cls)
    torch_dtype = model_dtype(dtype, device)
    from methods.io import pretrained_kwargs, weights_error

    kw = pretrained_kwargs(backbone)  # safetensors only unless allow_pickle_weights; revision
    rev = {"revision": kw["revision"]} if "revision" in kw else {}
    try:
        model = cls.from_pretrained(source, dtype=torch_dtype, attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise weights_error("fseg: LLaVA", str(source), e, kw) from None
    try:
        tok = AutoTokenizer.from_pretrained(source, **rev)
        proc = AutoImageProcessor.from_pretrained(source, **rev)
    except (OSError, ValueError) as e:
        raise OvssError(f"fseg: cannot load LLaVA {source!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    token = int(getattr(model.config, "image_token_index", None)
                or model.config.image_token_id)
    return Llava(model.to(device).eval(), tok, proc, arch, template, token, torch_dtype)
