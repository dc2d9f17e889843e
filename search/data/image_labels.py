"""Image-level labels: the only annotation a label-free (``--reward clip``) search reads.

The file is JSON ``{image_id: [class name, ...]}`` (default ``DATA_ROOT/image_labels.json``).
A name matches a class by its name or its readable name (``prompts[i][0]``), ignoring case,
spaces, ``-`` and ``_`` ("tv monitor" = "tvmonitor", ``methods.base.class_key``; a class set
never has two classes with one key); an integer is taken as the label value. "background" is
accepted and dropped, like the ignore value in dense mode. An image listed twice (JSON keeps
the last silently) or a class named twice for one image is refused.

Derive the file from dense label maps (a user tool, :mod:`search.data.make_image_labels`)::

    python -m search.data.make_image_labels --dataset voc21 --data-root /data/VOC2012 [--out FILE]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from methods.base import ClassSet, OvssError, class_key


def _name_index(classes: ClassSet) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, (name, prompts) in enumerate(zip(classes.names, classes.prompts)):
        index[class_key(prompts[0])] = index[class_key(name)] = i
    return index


def _unique_ids(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateImage(key)
        out[key] = value
    return out


class _DuplicateImage(Exception):
    pass


def read_image_labels(path: str | os.PathLike, classes: ClassSet) -> dict[str, list[int]]:
    """``{image_id: sorted label values}`` from a JSON list file; OvssError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise OvssError(f"image-label file {path} not found (write it with "
                        "python -m search.data.make_image_labels, or pass --image-labels FILE)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_ids)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OvssError(f"cannot read image-label file {path}: {e}") from None
    except _DuplicateImage as e:
        raise OvssError(f"image-label file {path}: {e.args[0]!r} is listed twice (JSON keeps "
                        "only the last list)") from None
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
        values: dict[int, object] = {}
        for name in names:
            if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < n:
                v = name
            elif isinstance(name, str) and class_key(name) in index:
                v = index[class_key(name)]
            elif isinstance(name, str) and class_key(name) == "background":
                continue
            else:
                raise OvssError(f"image-label file {path}: image {image_id!r} names unknown "
                                f"class {name!r}")
            if v in values:
                raise OvssError(f"image-label file {path}: image {image_id!r} names class "
                                f"{classes.names[v]!r} twice ({values[v]!r}, {name!r})")
            values[v] = name
        values = {v: nm for v, nm in values.items() if not (classes.background and v == 0)}
        out[str(image_id)] = sorted(values)
    return out
