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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from methods.base import OvssError
from methods.open_clip_backbone import TINY_DEFAULTS, load_clip, tiny_model_name  # noqa: F401


class _Templates(Mapping):
    """``name -> open_clip's template list``, imported on first lookup: decode never needs
    open_clip (its import costs ~1.5 s and ~240 MB in a trial worker)."""

    _ATTR = {"imagenet80": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}

    def __getitem__(self, name: str):
        import open_clip

        return getattr(open_clip, self._ATTR[name])

    def __contains__(self, name: object) -> bool:   # (Mapping's would import open_clip)
        return name in self._ATTR

    def __iter__(self) -> Iterator[str]:
        return iter(self._ATTR)

    def __len__(self) -> int:
        return len(self._ATTR)


TEMPLATES = _Templates()


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
