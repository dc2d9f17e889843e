"""Which classes go into the prompt when the image-level labels are unknown (``present=None``).

The paper asks GPT-4o which classes are in the image (kept when its stated probability is
> 70 %). Offline, the default here is a CLIP zero-shot filter (open_clip): the image is scored
against ``"a photo of a {name}."`` for every foreground class, ``p = softmax(100 · cos)``, and
the classes with ``p >= presence_threshold`` are kept, the most likely one always (the reference
falls back to one class when GPT-4o names none).

Any callable ``(image HxWx3 uint8, ClassSet) -> list[int]`` (label values) can replace it:
``segmenter.presence_filter = my_filter``; ``presence: all`` keeps every foreground class.

CLIP model: ``presence_model`` (open_clip name) with ``presence_pretrained`` (tag) or
``presence_path`` (a local checkpoint, read with weights_only=True); ``presence_model: tiny``
builds a tiny random-weight CLIP (tests and ``--preset smoke``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError
from methods.open_clip_backbone import load_clip, register_config, shipped_backbone, shipped_names

PresenceFilter = Callable[[np.ndarray, ClassSet], Sequence[int]]
_TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                         "patch_size": 8, "head_width": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                      "layers": 1}}
_TINY_NAME = "ovss-pnp-presence-tiny"


def all_classes(_image: np.ndarray, classes: ClassSet) -> list[int]:
    """``presence: all``: every foreground class."""
    return list(classes.foreground)


class ClipPresence:
    """CLIP zero-shot presence filter (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 threshold: float):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.threshold = float(threshold)
        self._text: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_settings(cls, s: Mapping[str, Any], device: str = "cpu") -> ClipPresence:
        import open_clip

        name, tag, path = s["presence_model"], s.get("presence_pretrained"), s.get("presence_path")
        if name == "tiny":
            _register_tiny()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(s.get("seed", 0)))
                model, _, pre = open_clip.create_model_and_transforms(_TINY_NAME, device=device)
            return cls(model, pre, open_clip.get_tokenizer(_TINY_NAME), s["presence_threshold"])
        if name in shipped_names():       # e.g. toy-clip: trained here, methods/weights/
            model, mname = load_clip(shipped_backbone(name), int(s.get("seed", 0)), device,
                                     what="pnp presence")
            pre = open_clip.image_transform(model.visual.image_size, is_train=False)
            return cls(model, pre, open_clip.get_tokenizer(mname), s["presence_threshold"])
        if name not in open_clip.list_models():
            raise OvssError(f"pnp: presence_model {name!r} is not an open_clip model (nor "
                            f"shipped weights: {', '.join(shipped_names()) or 'none'})")
        try:
            if path:
                if not Path(str(path)).expanduser().is_file():
                    raise OvssError(f"pnp: presence_path {path} not found")
                model, _, pre = open_clip.create_model_and_transforms(name, device=device)
                open_clip.load_checkpoint(model, str(Path(str(path)).expanduser()),
                                          weights_only=True)
            else:
                model, _, pre = open_clip.create_model_and_transforms(
                    name, pretrained=tag, device=device, require_pretrained=True)
        except OvssError:
            raise
        except Exception as e:  # noqa: BLE001 - offline, missing cache, bad file ...
            raise OvssError(f"pnp: presence CLIP {name}/{path or tag} is not available "
                            f"({str(e).splitlines()[0][:160]}); set settings.presence_path, "
                            f"settings.presence=all or pass the present classes") from None
        return cls(model, pre, open_clip.get_tokenizer(name), s["presence_threshold"])

    @torch.no_grad()
    def probabilities(self, image: np.ndarray, names: Sequence[str]) -> torch.Tensor:
        """``softmax(100 · cos(image, "a photo of a {name}."))`` over names: ``[len(names)]``."""
        from PIL import Image

        device = next(self.model.parameters()).device
        key = tuple(names)
        if key not in self._text:
            tokens = self.tokenizer([f"a photo of a {n}." for n in names]).to(device)
            self._text[key] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        pixels = self.preprocess(Image.fromarray(image))[None].to(device)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return torch.softmax(100.0 * img @ self._text[key].T, dim=-1)[0].cpu()

    def __call__(self, image: np.ndarray, classes: ClassSet) -> list[int]:
        fg = list(classes.foreground)
        p = self.probabilities(image, [classes.prompts[c][0] for c in fg])
        keep = {int(p.argmax())} | {i for i in range(len(fg)) if float(p[i]) >= self.threshold}
        return [fg[i] for i in sorted(keep)]


def _register_tiny() -> None:
    import open_clip

    if _TINY_NAME in open_clip.list_models():
        return
    register_config(_TINY_NAME, _TINY)


def build_presence_filter(settings: Mapping[str, Any], device: str = "cpu") -> PresenceFilter:
    """The filter named by ``settings.presence``: ``clip`` or ``all``."""
    kind = settings["presence"]
    if kind == "all":
        return all_classes
    if kind == "clip":
        return ClipPresence.from_settings(settings, device)
    raise OvssError(f"pnp: settings.presence must be clip or all, got {kind!r}")
