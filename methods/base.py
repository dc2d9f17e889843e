"""The Segmenter protocol: extract once (expensive, model), decode many (cheap, knobs).

Every method family is a small package under ``methods/`` whose ``SEGMENTER`` attribute is a
subclass of :class:`Segmenter`. The search (``search/``) only ever talks to this interface, so a
method can be used alone in a notebook::

    seg = get_segmenter_class("clipseg").from_spec(backbone_spec, settings, device="cpu")
    ev = seg.extract(image, classes)          # HxWx3 uint8 -> Evidence (tensors + JSON meta)
    label_map = seg.decode(ev, params)        # Evidence + knobs -> HxW int64 in [0, len(classes))

Nothing in here knows Ray, Optuna or MLflow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class OvssError(Exception):
    """A user-facing error: its message is one line that names the offending thing.

    The CLIs print ``error: <message>`` and exit with code 2, without a traceback.
    """


def class_key(name: str) -> str:
    """The form in which two class names or prompt texts are the same: lower case, without
    whitespace, ``-`` or ``_`` ("TV-monitor" = "tv monitor" = "tvmonitor"). CLIP's and BERT's
    tokenizers lower-case (so "Cat" and "cat" embed to the same vector), PnP squashes spaces and
    hyphens out of its prompt names, and image-label files match names this way: two classes
    whose names (or prompt texts) share a key could not be told apart by a prediction."""
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


def class_clash(names: Sequence[str], prompts: Sequence[Sequence[str]] = ()
                ) -> tuple[int, int, str] | None:
    """The first clash of a class list, or None: ``(i, j, text)`` with i < j when class j's
    name or one of its prompt texts (``prompts[j]``) has the :func:`class_key` of class i's name
    or of one of its prompt texts. Texts repeated within one class are no clash (synonyms are
    pooled per class)."""
    owner: dict[str, int] = {}
    for j, name in enumerate(names):
        texts = [name, *(prompts[j] if j < len(prompts) else ())]
        for text in texts:
            i = owner.get(class_key(text), j)
            if i != j:
                return i, j, text
        for text in texts:
            owner.setdefault(class_key(text), j)
    return None


#: Why two spellings are one class, for the messages that refuse a repeated name.
SAME_CLASS = "names that differ only in case, spaces, '-' or '_' are one class"
#: Why one text may not serve two classes, for the messages that refuse a shared prompt.
SHARED_TEXT = "a text embedded for two classes ties them wherever it fits best"


def clash_message(names: Sequence[str], clash: tuple[int, int, str]) -> str:
    """Words for a :func:`class_clash` (without saying where the list came from)."""
    i, j, text = clash
    if class_key(text) == class_key(names[j]) == class_key(names[i]):
        return f"class {j} {names[j]!r} repeats class {i} {names[i]!r} ({SAME_CLASS})"
    return (f"{text!r} is a name or prompt of both class {i} ({names[i]}) and class {j} "
            f"({names[j]}) ({SHARED_TEXT})")


@dataclass(frozen=True)
class ClassSet:
    """The label space a segmenter predicts into.

    names:      ``names[i]`` is the class with label value ``i``.
    prompts:    per class, the text names to embed (synonyms); ``prompts[i][0]`` is usually
                ``names[i]``. Methods that take one name per class use ``prompts[i][0]``.
    background: when True, ``names[0]`` is "background" and the method predicts label 0 by its
                own background rule (threshold, no-class-passes, ...), never by embedding a
                "background" text.

    No two classes may share a name or a prompt text under :func:`class_key` (OvssError naming
    both): the entry points (a data set's YAML or ``classes.txt``, ``--classes``) check first
    and name the file and line or the flag.
    """

    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...] = ()
    background: bool = False

    def __post_init__(self) -> None:
        if len(self.names) == 0 or (self.background and len(self.names) < 2):
            raise OvssError("class list is empty: give at least one class name")
        if any(not str(n).strip() for n in self.names):
            raise OvssError(f"class list has an empty name: {list(self.names)}")
        if not self.prompts:
            object.__setattr__(self, "prompts", tuple((n,) for n in self.names))
        if len(self.prompts) != len(self.names):
            raise OvssError(
                f"class list has {len(self.names)} names but {len(self.prompts)} prompt lists"
            )
        clash = class_clash(self.names, self.prompts)
        if clash is not None:
            raise OvssError(f"class list: {clash_message(self.names, clash)}")

    @classmethod
    def from_names(cls, names: Sequence[str], background: bool = False) -> ClassSet:
        """``from_names(["cat", "dog"])``; with ``background=True`` "background" is prepended."""
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise OvssError("class list is empty: give at least one class name")
        if background:
            if any(class_key(n) == "background" for n in names):
                raise OvssError("class list: 'background' is label 0 of this class set (the "
                                "method's own rule predicts it); leave it out of the names")
            names = ["background", *names]
        return cls(names=tuple(names), background=background)

    @property
    def foreground(self) -> list[int]:
        """Label values of the real (non-background) classes."""
        return list(range(1 if self.background else 0, len(self.names)))

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "prompts": [list(p) for p in self.prompts],
                "background": self.background}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassSet:
        return cls(names=tuple(d["names"]), prompts=tuple(tuple(p) for p in d["prompts"]),
                   background=bool(d["background"]))


@dataclass
class Evidence:
    """What ``extract`` hands to ``decode``: named tensors plus JSON-serialisable metadata.

    Stored on disk as safetensors (tensors) with ``meta`` as a JSON string in the header, so a
    cache file can never run code. Keep tensors compact: per-layer maps, not hidden-state stacks;
    float16 where the method has checked the error is small.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def merged(self, other: Evidence) -> Evidence:
        """A new Evidence with ``other``'s tensors and meta added (``other`` wins on clashes)."""
        return Evidence({**self.tensors, **other.tensors}, {**self.meta, **other.meta})

    def to_safetensors_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return tensors, {"ovss_meta": json.dumps(self.meta, sort_keys=True)}

    @classmethod
    def from_safetensors_dict(
        cls, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None
    ) -> Evidence:
        meta = json.loads((metadata or {}).get("ovss_meta", "{}"))
        return cls(dict(tensors), meta)


class Segmenter:
    """Base class of a method family. Subclasses set ``method`` and implement the hooks.

    Knob conventions: ``params`` is a plain dict of knob name -> value, exactly the keys of the
    method's ``defaults`` in ``conf/methods/<method>.yaml`` (the search space is a subset).
    """

    #: Method name, as in ``--method`` and ``conf/methods/<method>.yaml``.
    method: ClassVar[str] = ""
    #: Knobs that change extraction beyond the knob-independent first pass (e.g. PnP's
    #: Salience DropOut depends on layer/head/threshold). Empty for most methods.
    extraction_knobs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_spec(
        cls, backbone: Mapping[str, Any], settings: Mapping[str, Any], device: str = "cpu"
    ) -> Segmenter:
        """Build from a backbone entry of the method YAML and the method's settings.

        ``backbone`` has at least ``name`` plus the method's loading fields (hub id, local
        ``path`` override, or ``tiny`` config for tests). Loading problems raise OvssError.
        """
        raise NotImplementedError(f"{cls.__name__}.from_spec")

    @classmethod
    def knob_defaults(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Trial-0 values of knobs that depend on the settings (e.g. a protocol's per-data-set
        values); they replace the YAML defaults, a preset's ``defaults`` and an explicit
        ``--set knob=v`` win. No weights are read."""
        return {}

    @classmethod
    def check_classes(cls, settings: Mapping[str, Any], classes: ClassSet) -> None:
        """Before any model loads (a search calls it before Ray starts): OvssError when the
        method could not tell two of ``classes`` apart under these settings beyond what
        ClassSet itself refuses (e.g. PnP's ``prompt_names`` mapping two classes to one word).
        Nothing by default."""

    @classmethod
    def search_settings(
        cls,
        backbone: Mapping[str, Any],
        settings: Mapping[str, Any],
        defaults: Mapping[str, Any],
        space: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """The settings a search over ``space`` extracts with, decided before Ray starts.

        By default ``settings`` as they are. A method may narrow what ``extract`` stores to what
        the reachable knob values read (clipseg: the attention variants and SC-CLIP's layers),
        and raise OvssError naming a reachable knob value no trial could decode. ``defaults``:
        every knob's trial-0 value; ``space``: the searched knobs as plain dicts (``type``,
        ``low`` / ``high`` / ``step`` or ``choices``).
        """
        return dict(settings)

    def settings_key(self) -> dict[str, Any]:
        """Everything besides the image that the knob-independent evidence depends on
        (backbone identity, image size, ...): part of the evidence cache key."""
        raise NotImplementedError(f"{type(self).__name__}.settings_key")

    def extract(
        self, image: np.ndarray, classes: ClassSet, present: Sequence[int] | None = None
    ) -> Evidence:
        """Knob-independent expensive pass.

        image:   HxWx3 uint8 RGB in [0, 255].
        classes: the label space.
        present: label values known present in the image (image-level labels), or None when
                 unknown (methods that need them then use their own presence rule).
        """
        raise NotImplementedError(f"{type(self).__name__}.extract")

    def extend(
        self,
        evidence: Evidence,
        image: np.ndarray,
        classes: ClassSet,
        present: Sequence[int] | None,
        knobs: Mapping[str, Any],
    ) -> Evidence:
        """Knob-dependent extra extraction, for the knobs in ``extraction_knobs`` only.

        Returns only the *additional* tensors; the caller caches them keyed by ``knobs`` and
        passes ``evidence.merged(extra)`` to decode.
        """
        raise NotImplementedError(f"{type(self).__name__} has no knob-dependent extraction")

    def decode(self, evidence: Evidence, params: Mapping[str, Any]) -> np.ndarray:
        """Knobs -> label map. Pure tensor code, no model forward.

        Returns HxW int64 (the original image size), values in [0, len(classes)).
        """
        raise NotImplementedError(f"{type(self).__name__}.decode")

    # --- convenience -------------------------------------------------------------------------
    def extraction_subset(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {k: params[k] for k in self.extraction_knobs}

    def segment(
        self,
        image: np.ndarray,
        classes: ClassSet,
        params: Mapping[str, Any],
        present: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The whole pipeline on one image: extract (+ extend) then decode."""
        ev = self.extract(image, classes, present)
        if self.extraction_knobs:
            ev = ev.merged(
                self.extend(ev, image, classes, present, self.extraction_subset(params))
            )
        return self.decode(ev, params)


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an HxWx3 uint8 RGB array; raises OvssError naming ``what``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise OvssError(f"{what}: expected an HxWx3 RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise OvssError(f"{what}: expected uint8 pixels, got {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise OvssError(f"{what}: image of size {image.shape[:2]} is too small")
    return image
