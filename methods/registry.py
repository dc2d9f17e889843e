"""The method registry: method names -> the modules that implement them.

A method is a package whose ``SEGMENTER`` is a :class:`methods.base.Segmenter`: ``methods.<name>``
for the built-in ones (:data:`METHODS`), or any module named in ``$OVSS_METHOD_MODULES``.
``get_segmenter_class`` imports it lazily, so a user of one method does not pay for the imports
of the others.
"""

from __future__ import annotations

import importlib
import os

from methods.base import OvssError, Segmenter

METHODS = ("pnp", "clipseg", "fseg")


def _extra_methods() -> dict[str, str]:
    """``OVSS_METHOD_MODULES="toy=tests.toy_method"`` registers methods living outside methods/
    (used by the platform tests; a user can plug in their own method the same way)."""
    out = {}
    for item in os.environ.get("OVSS_METHOD_MODULES", "").split(","):
        if "=" in item:
            name, module = item.split("=", 1)
            out[name.strip()] = module.strip()
    return out


def known_methods() -> list[str]:
    return [*METHODS, *_extra_methods()]


def method_module_name(method: str) -> str:
    extra = _extra_methods()
    if method in extra:
        return extra[method]
    if method not in METHODS:
        raise OvssError(f"unknown method {method!r}: choose one of {', '.join(known_methods())}")
    return f"methods.{method}"


def get_segmenter_class(method: str) -> type[Segmenter]:
    module = importlib.import_module(method_module_name(method))
    return module.SEGMENTER

