"""Method families and what they share: the Segmenter protocol, the method registry, the method
spec (``conf/methods/<name>.yaml``), image I/O and running a tuned config.

Each method family is a sub-package ``methods/<name>/`` that exposes ``SEGMENTER``, a
:class:`methods.base.Segmenter`. ``get_segmenter_class("clipseg")`` imports ``methods.clipseg``
lazily (:mod:`methods.registry`), so a user of one method does not pay for the imports of the
others. ``load_segmenter(path)`` builds a ready segmenter from a config exported by
``python -m search.export`` (:mod:`methods.infer`).

May import: ``methods.*``, torch and the model libraries. Never ``search``, ``rewards``,
``bench`` or ``tests``, and never Ray, Optuna or MLflow, except :mod:`methods.model_uri`, which
reads a tuned config back from a registered MLflow model (only for a ``models:/`` URI). So a
method can be used alone, in a notebook, without the search.
"""

from __future__ import annotations

from methods.base import ClassSet, Evidence, OvssError, Segmenter
from methods.registry import METHODS, get_segmenter_class, known_methods, method_module_name

__all__ = ["METHODS", "ClassSet", "Evidence", "OvssError", "Segmenter", "get_segmenter_class",
           "known_methods", "load_segmenter", "method_module_name"]


def load_segmenter(path, device: str | None = None):
    """Build a :class:`methods.infer.TunedSegmenter` from an exported YAML config."""
    from methods.infer import TunedSegmenter

    return TunedSegmenter.from_file(path, device=device)
