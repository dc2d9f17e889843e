"""Image-level labels: the only annotation a label-free (``--reward clip``) search reads.

The file is JSON ``{image_id: [class name, ...]}`` (default ``DATA_ROOT/image_labels.json``).
A name matches a class by its name or its readable name (``prompts[i][0]``), ignoring case,
spaces, ``-`` and ``_`` ("tv monitor" = "tvmonitor"); an integer is taken as the label value.
"background" is accepted and dropped, like the ignore value in dense mode.

Derive the file from dense label maps (a user tool, :mod:`search.data.make_image_labels`)::

    python -m search.data.make_image_labels --dataset voc21 --data-root /data/VOC2012 [--out FILE]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from methods.base import ClassSet, OvssError


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _name_index(classes: ClassSet) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, prompts in reversed(list(enumerate(classes.prompts))):
        index[_key(prompts[0])] = i
    for i, name in reversed(list(enumerate(classes.names))):  # names win over readable names
        index[_key(name)] = i
    return index


def read_image_labels(path: str | os.PathLike, classes: ClassSet) -> dict[str, list[int]]:
    """``{image_id: sorted label values}`` from a JSON list file; OvssError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise OvssError(f"image-label file {path} not found (write it with "
                        "python -m search.data.make_image_labels, or pass --image-labels FILE)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OvssError(f"cannot read image-label file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise OvssError(f"image-label file {path}: expected a JSON object "
                        "{image_id: [class names]}")
    index = _name_index(classes)
    n = len(classes.names)
    out: dict[str, list[int]] = {}
    for image_id, names in raw.items():
        if not isinstance(names, list):
            raise OvssError(f"image-label file {path}: image {image_id!r} needs a list of "
                            "class names")
        values = set()
        for name in names:
            if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < n:
                v = name
            elif isinstance(name, str) and _key(name) in index:
                v = index[_key(name)]
            elif isinstance(name, str) and _key(name) == "background":
                continue
            else:
                raise OvssError(f"image-label file {path}: image {image_id!r} names unknown "
                                f"class {name!r}")
            if not (classes.background and v == 0):
                values.add(v)
        out[str(image_id)] = sorted(values)
    return out
