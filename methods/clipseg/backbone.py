"""Loading an open_clip CLIP exactly as a user would, and the class-name text embeddings.

A backbone entry of ``conf/methods/clipseg.yaml`` is one of:

- ``{model: ViT-B-16-quickgelu, pretrained: openai}``: open_clip model name + pretrained tag
  (downloaded into / read from the Hugging Face cache by open_clip itself);
- the same plus ``path: /models/clip.safetensors``: a local checkpoint overrides the tag (the
  file is read with ``weights_only=True``);
- ``{tiny: {width: 64, layers: 4, ...}}``: a tiny model config registered with open_clip
  (``open_clip.add_model_config`` on a JSON file), so the model is the real ``open_clip.CLIP``
  class with random weights seeded by ``settings.seed``; used by tests and ``--preset smoke``.

Text embeddings (family protocol): every class name is put in the prompt templates (the 80
OpenAI ImageNet templates by default), each prompt embedding is L2-normalised, the mean over the
templates is taken and L2-normalised again. One row per *name* (synonyms included).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from methods.base import OvssError

#: Fields of a ``tiny:`` block and their defaults: a 4-block ViT on 32 px inputs, patch 8.
TINY_DEFAULTS: dict[str, int] = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "heads": 2,
    "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 77,
}

TEMPLATES = {
    "imagenet80": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
}

_TINY_DIR: Path | None = None


def tiny_model_name(tiny: Mapping[str, Any]) -> str:
    """Register a tiny CLIP config with open_clip and return its model name.

    ``tiny`` overrides :data:`TINY_DEFAULTS`. The JSON has the same schema as open_clip's own
    ``model_configs/*.json`` (vision ``head_width`` = width / heads).
    """
    global _TINY_DIR
    unknown = set(tiny) - set(TINY_DEFAULTS)
    if unknown:
        raise OvssError(f"tiny backbone: unknown field(s) {sorted(unknown)}; "
                        f"known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **{k: int(v) for k, v in tiny.items()}}
    if c["width"] % c["heads"] or c["image_size"] % c["patch_size"]:
        raise OvssError(f"tiny backbone: width must divide by heads and image_size by "
                        f"patch_size, got {c}")
    name = "ovss-tiny-" + "-".join(f"{k}{c[k]}" for k in sorted(c))
    if name not in open_clip.list_models():
        cfg = {
            "embed_dim": c["embed_dim"],
            "vision_cfg": {"image_size": c["image_size"], "layers": c["layers"],
                           "width": c["width"], "patch_size": c["patch_size"],
                           "head_width": c["width"] // c["heads"]},
            "text_cfg": {"context_length": c["context_length"], "vocab_size": 49408,
                         "width": c["text_width"], "heads": c["text_heads"],
                         "layers": c["text_layers"]},
        }
        if _TINY_DIR is None:
            _TINY_DIR = Path(tempfile.mkdtemp(prefix="ovss-openclip-"))
        path = _TINY_DIR / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return name


def load_clip(backbone: Mapping[str, Any], seed: int, device: str) -> tuple[torch.nn.Module, str]:
    """Build the open_clip model of a backbone entry; returns ``(model in eval mode, name)``.

    Raises OvssError naming the model / tag / path when it cannot be built or loaded.
    """
    label = backbone.get("name", "?")
    if backbone.get("tiny") is not None:
        name = tiny_model_name(dict(backbone["tiny"] or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = open_clip.create_model(name, pretrained=None, device=device)
        return model.eval(), name
    name = backbone.get("model")
    if not name:
        raise OvssError(f"clipseg backbone {label!r} has no 'model' (an open_clip model name)")
    if name not in open_clip.list_models():
        raise OvssError(f"clipseg backbone {label!r}: unknown open_clip model {name!r}")
    path = backbone.get("path")
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise OvssError(f"clipseg backbone {label!r}: checkpoint {p} not found")
        model = open_clip.create_model(name, pretrained=None, device=device)
        try:
            open_clip.load_checkpoint(model, str(p), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is the user's file
            raise OvssError(f"clipseg backbone {label!r}: cannot load checkpoint {p} into "
                            f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                            ) from None
        return model.eval(), name
    tag = backbone.get("pretrained")
    if not tag:
        raise OvssError(f"clipseg backbone {label!r}: give 'pretrained' (open_clip tag) or 'path'")
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise OvssError(f"clipseg backbone {label!r}: open_clip has no pretrained tag {tag!r} "
                        f"for {name} (see open_clip.list_pretrained())")
    try:
        model = open_clip.create_model(name, pretrained=tag, device=device,
                                       require_pretrained=True)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, corrupt download ...
        raise OvssError(f"clipseg backbone {label!r}: weights {name}/{tag} are not available "
                        f"({str(e).splitlines()[0][:160]}); set backbone.path=<checkpoint>"
                        ) from None
    return model.eval(), name


@torch.no_grad()
def name_embeddings(
    model: torch.nn.Module, tokenizer: Any, names: Sequence[str], templates: str,
    batch: int = 256,
) -> torch.Tensor:
    """Template-averaged text embeddings: ``len(names) x E`` float32, rows of unit L2 norm.

    Each name is put in every template, every prompt embedding is normalised, the mean over
    templates is normalised again (the family's zero-shot classifier weights).
    """
    if templates not in TEMPLATES:
        raise OvssError(f"clipseg: unknown templates {templates!r}; choose {sorted(TEMPLATES)}")
    temps = TEMPLATES[templates]
    prompts = [t(n) for n in names for t in temps]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        tokens = tokenizer(prompts[i:i + batch]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(out).view(len(names), len(temps), -1).mean(1)
    return F.normalize(emb, dim=-1).cpu()
