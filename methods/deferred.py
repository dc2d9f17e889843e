"""A model built on first use: a trial worker that only decodes cached evidence never builds it.

``clipseg``, ``pnp`` and ``fseg`` hold their model as ``Deferred(build)`` when they are built
without weights (``ClipSegSegmenter.from_decode_state``, ``PnPSegmenter.from_spec``, fseg's
LLaVA in ``FSegSegmenter.from_spec``); the first access that truly needs the model (extract,
extend, text embeddings) calls ``build()`` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deferred:
    """A value built (once, by its holder calling ``build()``) when first needed."""

    def __init__(self, build: Callable[[], Any]):
        self.build = build

