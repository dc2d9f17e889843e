"""The second vision model of ProxyCLIP and Trident: DINO, DINOv2 or SAM beside CLIP.

A vision model is an entry of ``settings.vision_models`` (``conf/methods/clipseg.yaml``),
named by ``settings.vision`` (the models extract runs) or ``settings.sam`` (Trident's SAM):

- ``{arch: dino, model: facebook/dino-vitb8}``: a Hugging Face hub id, loaded with
  transformers' own class (``ViTModel`` for DINO, ``Dinov2Model`` for ``dinov2``,
  ``Dinov2WithRegistersModel`` for ``dinov2_reg``); ``path:`` a local copy overrides the id;
  safetensors only unless the entry sets ``allow_pickle_weights: true`` (as every backbone);
- ``{arch: sam, size: vit_b, path: sam_vit_b_01ec64.pth}``: segment-anything's ``Sam`` from
  a checkpoint file (read with ``weights_only=True``); ``random: true`` builds random weights;
- ``tiny: {...}`` (any arch): the same class from a tiny config with random weights seeded by
  ``settings.seed``, for tests and ``--preset smoke_second``; ``random: true``: the real ViT-B
  architecture with random weights (benchmarks, ``bench/frontier.py``).

Preprocessing as the official code (ProxyCLIP ``proxyclip_segmentor.py`` 79-80, 113): the
CLIP-normalised (and padded) window is mapped back to pixels with CLIP's mean / std and
normalised with ImageNet's; DINO / DINOv2 see the window at its size, SAM resized to its input
size (1024; ``proxyclip_segmentor.py`` 118-122). Features (``VisionModel.features``): DINO's
last block output after its final LayerNorm, class token dropped (``get_intermediate_layers``,
dino ``vision_transformer.py`` 225-233); DINOv2 the same less the register tokens; SAM its neck
output (256-d). DINO's positional embedding is resized as DINO does it (bicubic,
``scale_factor = (g + 0.1) / sqrt(N)``, ``vision_transformer.py`` 174-194), not as
transformers' ``ViTModel`` does (target size); DINOv2 with registers is transformers' own, which
is the official rule for the ``_reg`` models (size, antialias; dinov2 ``hub/backbones.py``
113-125).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import OvssError
from methods.io import pretrained_kwargs

ARCHS = ("dino", "dinov2", "dinov2_reg", "sam")
#: torchvision ``Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Fields of a vision-model entry.
FIELDS = ("arch", "model", "revision", "path", "size", "random", "tiny", "layer_norm_eps",
          "patch", "allow_pickle_weights")
#: Tiny configs (fields of a ``tiny:`` block and their defaults).
TINY = {"hidden": 32, "layers": 2, "heads": 2, "patch": 8, "image_size": 32}


@dataclass
class VisionModel:
    """A loaded second vision model. ``module``: the transformers model or segment-anything
    ``Sam``; ``patch``: px per token; ``input_size``: SAM's square input (px), else None."""

    name: str
    arch: str
    module: nn.Module
    patch: int
    input_size: int | None = None

    def grid(self, ph: int, pw: int) -> tuple[int, int]:
        """Token grid of a ph x pw window."""
        if self.input_size is not None:
            return self.input_size // self.patch, self.input_size // self.patch
        return ph // self.patch, pw // self.patch

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x ph x pw ImageNet-normalised windows -> B x C x gh x gw float32."""
        dev = next(self.module.parameters()).device
        x = pixels.to(dev, torch.float32)
        b = x.shape[0]
        if self.input_size is None and (x.shape[-2] % self.patch or x.shape[-1] % self.patch):
            raise OvssError(f"clipseg: vision model {self.name!r} (patch {self.patch}) cannot "
                            f"take a {x.shape[-2]} x {x.shape[-1]} px window")
        gh, gw = self.grid(*x.shape[-2:])
        if self.arch == "sam":
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
            return self.module.image_encoder(x).float()
        if self.arch == "dino":
            tokens = dino_tokens(self.module, x)[:, 1:]
        else:
            skip = 1 + int(getattr(self.module.config, "num_register_tokens", 0) or 0)
            tokens = self.module(pixel_values=x).last_hidden_state[:, skip:]
        return tokens.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).float()


def dino_pos_embed(pos: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` (dino ``vision_transformer.py`` 174-194) on a
    1 x (1 + N) x D table for an h x w input: the patch part bicubically resized with
    ``scale_factor = (g + 0.1) / sqrt(N)``; unchanged when N and the grid agree and h == w."""
    n = pos.shape[1] - 1
    gh, gw = h // patch, w // patch
    if gh * gw == n and h == w:
        return pos
    m, dim = int(math.sqrt(n)), pos.shape[-1]
    grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / math.sqrt(n), (gw + 0.1) / math.sqrt(n)),
                         mode="bicubic")
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise OvssError(f"vision model: DINO positional embedding resized to "
                        f"{tuple(grid.shape[-2:])}, not {(gh, gw)}")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def dino_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DINO's ``get_intermediate_layers(x)[0]`` on a transformers ``ViTModel``: patch
    embedding, class token, DINO's positional embedding, the blocks, the final LayerNorm.
    x: B x 3 x H x W -> B x (1 + gh gw) x D."""
    emb = model.embeddings
    patches = emb.patch_embeddings(x)
    tokens = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
    tokens = tokens + dino_pos_embed(emb.position_embeddings, x.shape[-2], x.shape[-1],
                                     int(model.config.patch_size))
    for layer in model.layers:
        tokens = layer(tokens)
    return model.layernorm(tokens)


def vision_entry(settings: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The entry ``name`` of ``settings.vision_models``, checked (no weights are read): an
    OvssError names an unknown model, an unknown arch or field, and a missing checkpoint."""
    models = settings.get("vision_models") or {}
    if not isinstance(models, Mapping) or name not in models:
        known = sorted(models) if isinstance(models, Mapping) else []
        raise OvssError(f"clipseg: vision model {name!r} is not in settings.vision_models "
                        f"(known: {', '.join(known) or 'none'})")
    spec = dict(models[name] or {})
    unknown = set(spec) - set(FIELDS)
    if unknown:
        raise OvssError(f"clipseg: vision model {name!r} has unknown field(s) {sorted(unknown)} "
                        f"(fields: {', '.join(FIELDS)})")
    arch = spec.get("arch")
    if arch not in ARCHS:
        raise OvssError(f"clipseg: vision model {name!r}: arch must be one of {ARCHS}, "
                        f"got {arch!r}")
    if spec.get("tiny") is not None:
        bad = set(spec["tiny"] or {}) - set(TINY)
        if bad:
            raise OvssError(f"clipseg: vision model {name!r}: unknown tiny field(s) "
                            f"{sorted(bad)} (fields: {', '.join(TINY)})")
        spec["patch"] = 16 if arch == "sam" else int((spec["tiny"] or {}).get("patch",
                                                                             TINY["patch"]))
        return spec
    if arch == "sam":
        from methods.fseg.sam import SAM_SIZES

        if spec.get("size", "vit_b") not in SAM_SIZES:
            raise OvssError(f"clipseg: vision model {name!r}: size must be one of "
                            f"{sorted(SAM_SIZES)}, got {spec.get('size')!r}")
        if not spec.get("random") and not (spec.get("path")
                                           and Path(str(spec["path"])).expanduser().is_file()):
            raise OvssError(f"clipseg: vision model {name!r}: SAM checkpoint "
                            f"{spec.get('path')!r} not found (download sam_vit_b_01ec64.pth "
                            f"and give its path)")
        return spec
    if spec.get("random"):
        return spec
    if spec.get("path"):
        if not Path(str(spec["path"])).expanduser().exists():
            raise OvssError(f"clipseg: vision model {name!r}: path {spec['path']} not found")
    elif not spec.get("model"):
        raise OvssError(f"clipseg: vision model {name!r}: give 'model' (a hub id) or 'path'")
    return spec


def _tiny_module(arch: str, tiny: Mapping[str, Any]) -> tuple[nn.Module, int, int | None]:
    c = {**TINY, **{k: int(v) for k, v in tiny.items()}}
    if arch == "sam":
        from methods.fseg.sam import SAM_SIZES, build_sam

        sam = build_sam(**SAM_SIZES["tiny"])
        return sam, 16, int(sam.image_encoder.img_size)
    common = {"hidden_size": c["hidden"], "num_hidden_layers": c["layers"],
              "num_attention_heads": c["heads"], "patch_size": c["patch"],
              "image_size": c["image_size"], "layer_norm_eps": 1e-6}
    if arch == "dino":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(intermediate_size=4 * c["hidden"], qkv_bias=True, **common)
        return ViTModel(cfg, add_pooling_layer=False), c["patch"], None
    if arch == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**common)), c["patch"], None
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common)),
            c["patch"], None)


def _random_module(spec: Mapping[str, Any]) -> tuple[nn.Module, int, int | None]:
    """The ViT-B architecture of ``arch`` with random weights (benchmarks): DINO at 224 px with
    the entry's patch (8 or 16), DINOv2 ViT-B/14 at 518 px."""
    arch, patch = spec["arch"], int(spec.get("patch") or 16)
    if arch == "dino":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(patch_size=patch, qkv_bias=True, layer_norm_eps=1e-6)
        return ViTModel(cfg, add_pooling_layer=False), patch, None
    import transformers

    cls = "Dinov2Model" if arch == "dinov2" else "Dinov2WithRegistersModel"
    cfg = getattr(transformers, cls.replace("Model", "Config"))(patch_size=14, image_size=518)
    return getattr(transformers, cls)(cfg), 14, None


def _hub_module(name: str, spec: Mapping[str, Any]) -> tuple[nn.Module, int, int | None]:
    arch = spec["arch"]
    if arch == "sam":
        from methods.fseg.sam import load_sam

        sam = load_sam({"name": name, "sam": spec.get("size", "vit_b"),
                        "sam_checkpoint": spec.get("path"), "sam_random": spec.get("random")},
                       0, "cpu")
        return sam, 16, int(sam.image_encoder.img_size)
    import transformers

    cls = {"dino": "ViTModel", "dinov2": "Dinov2Model",
           "dinov2_reg": "Dinov2WithRegistersModel"}[arch]
    source = str(Path(str(spec["path"])).expanduser()) if spec.get("path") else spec["model"]
    # safetensors only unless the entry sets allow_pickle_weights; its hub revision
    kw = pretrained_kwargs(spec)
    if arch == "dino":
        kw["add_pooling_layer"] = False
    if spec.get("layer_norm_eps") is not None:
        kw["layer_norm_eps"] = float(spec["layer_norm_eps"])
    try:
        model = getattr(transformers, cls).from_pretrained(source, **kw)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, wrong files ...
        text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        if kw["use_safetensors"] and "safetensors" in text:
            raise OvssError(f"clipseg: vision model {name!r}: {source!r} has no safetensors "
                            f"weights (pickled .bin files can run code when read): convert them "
                            f"with save_pretrained, or set settings.vision_models.{name}."
                            f"allow_pickle_weights=true") from None
        raise OvssError(f"clipseg: vision model {name!r}: cannot load {source} as {cls} "
                        f"({type(e).__name__}: {text}); set its 'path' to a local copy") from None
    patch = model.config.patch_size
    return model, int(patch[0] if isinstance(patch, (list, tuple)) else patch), None


def load_vision(settings: Mapping[str, Any], name: str, device: str = "cpu") -> VisionModel:
    """The vision model ``name`` of ``settings.vision_models``, in eval mode on ``device``."""
    spec = vision_entry(settings, name)
    if spec.get("tiny") is not None or spec.get("random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(settings.get("seed", 0)))
            if spec.get("tiny") is not None:
                module, patch, size = _tiny_module(spec["arch"], dict(spec["tiny"] or {}))
            elif spec["arch"] == "sam":
                module, patch, size = _hub_module(name, spec)
            else:
                module, patch, size = _random_module(spec)
    else:
        module, patch, size = _hub_module(name, spec)
    if spec.get("patch") and int(spec["patch"]) != patch:
        raise OvssError(f"clipseg: vision model {name!r} has patch {patch}, its entry says "
                        f"{spec['patch']}")
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return VisionModel(name, spec["arch"], module, patch, size)


def imagenet_pixels(clip_pixels: torch.Tensor, clip_mean: torch.Tensor,
                    clip_std: torch.Tensor) -> torch.Tensor:
    """ProxyCLIP's ``norm(unnorm(img))``: CLIP-normalised windows (B x 3 x h x w, padding
    included) back to [0, 1] pixels with CLIP's mean / std (3 x 1 x 1), then ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (clip_pixels * clip_std + clip_mean - mean) / std
