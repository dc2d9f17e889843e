"""open_clip models as users load them, shared by ``methods.clipseg`` and the CLIP reward.

A backbone entry (a method's or ``conf/rewards/clip.yaml``'s) is one of:

- ``{model: ViT-B-16-quickgelu, pretrained: openai}``: open_clip model name + pretrained tag;
- the same plus ``path: /models/clip.safetensors``: a local checkpoint overrides the tag (read
  with ``weights_only=True``);
- ``{tiny: {width: 64, layers: 4, ...}}``: a tiny config registered with open_clip, so the model
  is the real ``open_clip.CLIP`` class with random weights seeded by ``seed`` (tests, smoke);
- the same plus ``shipped: toy-clip``: weights shipped in this package
  (``methods/weights/<name>.safetensors``, e.g. the toy CLIP that ``bench/toy_clip_train.py``
  trains on generated scenes) loaded into that class, or ``path: FILE``: such a file elsewhere
  (it wins over ``shipped``); the file's metadata must name the same tiny config.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from methods.base import OvssError

#: Fields of a ``tiny:`` block and their defaults: a 4-block ViT on 32 px inputs, patch 8.
TINY_DEFAULTS: dict[str, int] = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "heads": 2,
    "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 77,
}
#: Non-integer fields: ``quick_gelu`` (bool) and ``vision`` / ``text`` dicts merged as they are
#: into open_clip's vision_cfg / text_cfg (e.g. ``vision: {pool_type: avg}``).
TINY_EXTRAS = ("quick_gelu", "vision", "text")


#: Where shipped weights live: ``shipped: NAME`` reads ``SHIPPED_DIR / f"{NAME}.safetensors"``.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


def shipped_path(name: str) -> Path:
    """The file of shipped weights ``name``; OvssError naming the ones there are."""
    p = SHIPPED_DIR / f"{name}.safetensors"
    if "/" in str(name) or not p.is_file():
        raise OvssError(f"shipped weights {name!r} not found in {SHIPPED_DIR} "
                        f"(shipped: {', '.join(shipped_names()) or 'none'})")
    return p


def shipped_names() -> list[str]:
    """The names of the weights shipped in :data:`SHIPPED_DIR`."""
    return sorted(f.stem for f in SHIPPED_DIR.glob("*.safetensors"))


def shipped_backbone(name: str) -> dict[str, Any]:
    """The backbone entry of shipped weights ``name``: its tiny config (from the file's
    metadata) and ``shipped: name`` (e.g. pnp's presence filter on the toy CLIP)."""
    from safetensors import safe_open

    with safe_open(str(shipped_path(name)), framework="pt") as f:
        tiny = json.loads((f.metadata() or {}).get("tiny", "null"))
    if not isinstance(tiny, dict):
        raise OvssError(f"shipped weights {name!r}: no tiny config in the file's metadata")
    return {"name": name, "tiny": tiny, "shipped": name}


def load_tiny_weights(model: torch.nn.Module, path: str | Path, tiny: Mapping[str, Any]) -> None:
    """Load a tiny model's safetensors file (float16 on disk, ``bench/toy_clip_train.py``) into
    ``model`` (float32), checking that it was trained for this ``tiny`` config (metadata
    ``tiny``). The file is read as tensors only (no pickle)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    p, name = Path(path).expanduser(), Path(path).stem
    if not p.is_file():
        raise OvssError(f"tiny weights {p} not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        state = {k: v.float() for k, v in load_file(str(p)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise OvssError(f"tiny weights {p}: not a safetensors file ({str(e)[:120]})") from None
    want = json.loads(meta.get("tiny", "null"))
    if want != dict(tiny):
        raise OvssError(f"weights {name!r} were trained for tiny config {want}, "
                        f"the backbone entry asks for {dict(tiny)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OvssError(f"weights {name!r} do not fit the model: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")


def tiny_model_name(tiny: Mapping[str, Any], register: bool = True) -> str:
    """Register a tiny CLIP config with open_clip and return its model name (``register=False``:
    the name only, without importing open_clip).

    ``tiny`` overrides :data:`TINY_DEFAULTS`. The JSON has the same schema as open_clip's own
    ``model_configs/*.json`` (vision ``head_width`` = width / heads).
    """
    unknown = set(tiny) - set(TINY_DEFAULTS) - set(TINY_EXTRAS)
    if unknown:
        raise OvssError(f"tiny backbone: unknown field(s) {sorted(unknown)}; "
                        f"known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **{k: int(v) for k, v in tiny.items() if k not in TINY_EXTRAS}}
    if c["width"] % c["heads"] or c["image_size"] % c["patch_size"]:
        raise OvssError(f"tiny backbone: width must divide by heads and image_size by "
                        f"patch_size, got {c}")
    extras = {k: tiny[k] for k in TINY_EXTRAS if k in tiny}
    name = "ovss-tiny-" + "-".join(f"{k}{c[k]}" for k in sorted(c))
    if extras:
        import hashlib

        name += "-" + hashlib.sha1(json.dumps(extras, sort_keys=True).encode()).hexdigest()[:8]
    if not register:
        return name
    import open_clip  # here, not at import: a decode-only worker never needs it (~1.5 s, 240 MB)

    if name not in open_clip.list_models():
        cfg = {
            "embed_dim": c["embed_dim"],
            "quick_gelu": bool(extras.get("quick_gelu", False)),
            "vision_cfg": {"image_size": c["image_size"], "layers": c["layers"],
                           "width": c["width"], "patch_size": c["patch_size"],
                           "head_width": c["width"] // c["heads"],
                           **dict(extras.get("vision", {}))},
            "text_cfg": {"context_length": c["context_length"], "vocab_size": 49408,
                         "width": c["text_width"], "heads": c["text_heads"],
                         "layers": c["text_layers"], **dict(extras.get("text", {}))},
        }
        register_config(name, cfg)
    return name


def register_config(name: str, cfg: Mapping[str, Any]) -> None:
    """Add the model config ``cfg`` (open_clip's ``model_configs/*.json`` schema) to open_clip
    under ``name``. open_clip reads the file when it is added and keeps the config in memory;
    the file and its folder go at once (a later rescan skips a path that is no longer there)."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="ovss-openclip-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def load_clip(backbone: Mapping[str, Any], seed: int, device: str,
              what: str = "clipseg") -> tuple[torch.nn.Module, str]:
    """Build the open_clip model of a backbone entry; returns ``(model in eval mode, name)``.

    Raises OvssError naming the model / tag / path when it cannot be built or loaded.
    """
    import open_clip

    label = backbone.get("name", "?")
    if backbone.get("tiny") is not None:
        name = tiny_model_name(dict(backbone["tiny"] or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = open_clip.create_model(name, pretrained=None, device=device)
        weights = backbone.get("path") or (shipped_path(str(backbone["shipped"]))
                                           if backbone.get("shipped") else None)
        if weights:
            load_tiny_weights(model, weights, dict(backbone["tiny"] or {}))
        return model.eval(), name
    name = backbone.get("model")
    if not name:
        raise OvssError(f"{what} backbone {label!r} has no 'model' (an open_clip model name)")
    if name not in open_clip.list_models():
        raise OvssError(f"{what} backbone {label!r}: unknown open_clip model {name!r}")
    path = backbone.get("path")
    if path:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise OvssError(f"{what} backbone {label!r}: checkpoint {p} not found")
        model = open_clip.create_model(name, pretrained=None, device=device)
        try:
            open_clip.load_checkpoint(model, str(p), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is the user's file
            raise OvssError(f"{what} backbone {label!r}: cannot load checkpoint {p} into "
                            f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                            ) from None
        return model.eval(), name
    tag = backbone.get("pretrained")
    if not tag:
        raise OvssError(f"{what} backbone {label!r}: give 'pretrained' (open_clip tag) or 'path'")
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise OvssError(f"{what} backbone {label!r}: open_clip has no pretrained tag {tag!r} "
                        f"for {name} (see open_clip.list_pretrained())")
    try:
        model = open_clip.create_model(name, pretrained=tag, device=device,
                                       require_pretrained=True)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, corrupt download ...
        raise OvssError(f"{what} backbone {label!r}: weights {name}/{tag} are not available "
                        f"({str(e).splitlines()[0][:160]}); set backbone.path=<checkpoint>"
                        ) from None
    return model.eval(), name
