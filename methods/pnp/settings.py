"""The settings of PnP-OVSS (``conf/methods/pnp.yaml: settings``): their defaults, which of them
change the evidence (and so the cache key), and the check of a settings block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from methods.base import OvssError
from methods.pnp.formulas import DROP_RULES
from methods.pnp.postprocess import CRF_DEFAULTS

SETTINGS: dict[str, Any] = {
    "seed": 0, "image_size": 336, "prompt_prefix": "a picture of", "squash_names": True,
    "enc_token": True, "drop_rule": "top_k", "drop_k": 10, "drop_threshold": 0.5,
    "drop_fill": "mean", "first_weight": 2.0, "work_max_side": 512,
    "evidence_dtype": "float16", "presence": "clip", "presence_model": "ViT-B-16-quickgelu",
    "presence_pretrained": "openai", "presence_path": None, "presence_threshold": 0.1,
    "presence_source": "model", "prompt_classes": "present", "prompt_names": {},
    **CRF_DEFAULTS,
}
#: Settings that change extract's or extend's output (the CRF ones only change decode).
EXTRACT_SETTINGS = ("image_size", "prompt_prefix", "squash_names", "enc_token", "drop_rule",
                    "drop_k", "drop_threshold", "drop_fill", "work_max_side", "evidence_dtype",
                    "presence", "presence_model", "presence_pretrained", "presence_path",
                    "presence_threshold", "presence_source", "prompt_classes", "prompt_names")
#: Where a search takes each image's present classes from (search/ passes ``present`` to
#: extract only for the last two; ``model``: ``present=None``, the presence filter decides).
PRESENCE_SOURCES = ("model", "image_labels", "ground_truth")
#: ``present``: the prompt lists the present classes (the reference's inference); ``all``: it
#: lists every class of the class set and the present classes' maps are picked out of it (the
#: reference's search scripts).
PROMPT_CLASSES = ("present", "all")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
FILLS = ("mean", "black")
VERSION = 1


def checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` over :data:`SETTINGS`, each checked: OvssError naming an unknown setting or
    a value outside its choices."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise OvssError(f"pnp: unknown setting(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")
    s = {**SETTINGS, **settings}
    for key, allowed in (("evidence_dtype", DTYPES), ("drop_rule", DROP_RULES),
                         ("drop_fill", FILLS)):
        if s[key] not in allowed:
            raise OvssError(f"pnp: settings.{key} must be one of {sorted(allowed)}, "
                            f"got {s[key]!r}")
    for key, allowed in (("presence_source", PRESENCE_SOURCES),
                         ("prompt_classes", PROMPT_CLASSES)):
        if s[key] not in allowed:
            raise OvssError(f"pnp: settings.{key} must be one of {list(allowed)}, "
                            f"got {s[key]!r}")
    names = s["prompt_names"]
    if not isinstance(names, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip()
            for k, v in names.items()):
        raise OvssError(f"pnp: settings.prompt_names must map class names to non-empty "
                        f"prompt names, got {names!r}")
    return s
