"""``open_dataset`` and ``SegDataset``: images, dense label maps and image-level labels.

Label maps come back as ``HxW int64`` label values that index ``classes.names`` (255 = ignore),
after the data set's remap (``reduce_zero_label``: VOC20, Context59, ADE20K). In
``labels="image"`` mode the data set never reads a dense label map: ``label(i)`` raises
``DenseLabelsForbidden`` and ``image_labels(i)`` comes from a JSON list file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from methods.base import OvssError
from methods.io import image_size, load_image, load_label
from search.data.image_labels import read_image_labels
from search.data.spec import FOLDER, LAYOUTS, DatasetSpec, folder_spec, load_spec

LABEL_MODES = ("dense", "image")
#: Decoded images and label maps kept in memory per data set (a search decodes each many times).
DEFAULT_CACHE_BYTES = 256 << 20


class DenseLabelsForbidden(OvssError):
    """``label(i)`` called on a data set opened with ``labels="image"`` (label-free search)."""


@dataclass(frozen=True)
class Record:
    """One image: its id, its file, and the label map file the layout puts next to it."""

    id: str
    image: Path
    label: Path


class _ByteCache:
    """A least-recently-used dict of numpy arrays bounded by their total size."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._d: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> np.ndarray | None:
        a = self._d.get(key)
        if a is not None:
            self._d.move_to_end(key)
        return a

    def put(self, key: Any, a: np.ndarray) -> None:
        if a.nbytes > self.max_bytes or key in self._d:
            return
        self._d[key] = a
        self._bytes += a.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self._bytes -= old.nbytes


class SegDataset:
    """A list of images of one split, with the data set's classes and label rules.

    ``image(i)``: HxWx3 uint8 RGB. ``label(i)``: HxW int64 in ``[0, len(classes.names))`` or
    ``ignore_index``. ``image_labels(i)``: sorted label values present in image i (never the
    ignore value, never 0 for background data sets).
    """

    def __init__(self, spec: DatasetSpec, root: Path, split: str, records: Sequence[Record],
                 labels: str = "dense", image_labels: dict[str, list[int]] | None = None,
                 image_labels_file: Path | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.spec = spec
        self.name = spec.name
        self.root = root
        self.split = split
        self.labels = labels
        self.classes = spec.class_set()
        self.ignore_index = spec.ignore_index
        self.background_prompts = tuple(spec.background_prompts)
        self.image_labels_file = image_labels_file
        self._records = list(records)
        self._listed = image_labels
        self._cache = _ByteCache(cache_bytes)
        self._present: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"SegDataset({self.name!r}, root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)}, labels={self.labels!r})")

    def ids(self) -> list[str]:
        return [r.id for r in self._records]

    def image_path(self, i: int) -> Path:
        return self._records[i].image

    def label_path(self, i: int) -> Path:
        return self._records[i].label

    def subset(self, indices: Iterable[int]) -> SegDataset:
        """The images ``indices`` (in that order), e.g. ``range(n)`` for the first n."""
        records = [self._records[i] for i in indices]
        return SegDataset(self.spec, self.root, self.split, records, self.labels, self._listed,
                          self.image_labels_file, self._cache.max_bytes)

    def image(self, i: int) -> np.ndarray:
        """HxWx3 uint8 RGB in [0, 255] (EXIF orientation applied); a fresh array per call."""
        rec = self._records[i]
        a = self._cache.get(("image", rec.id))
        if a is None:
            a = load_image(rec.image)
            self._cache.put(("image", rec.id), a)
        return a.copy()

    def label(self, i: int) -> np.ndarray:
        """HxW int64 label values (remapped, checked against the image size and class count)."""
        rec = self._records[i]
        if self.labels != "dense":
            raise DenseLabelsForbidden(
                f"data set {self.name} was opened with labels='image': dense label map of "
                f"image {rec.id!r} must not be read")
        a = self._cache.get(("label", rec.id))
        if a is None:
            a = self._read_label(rec)
            self._cache.put(("label", rec.id), a)
        return a.astype(np.int64)

    def _read_label(self, rec: Record) -> np.ndarray:
        if not rec.label.is_file():
            raise OvssError(f"image {rec.image} has no label map (expected {rec.label})")
        raw = load_label(rec.label)
        h, w = image_size(rec.image)
        if raw.shape != (h, w):
            raise OvssError(f"label map of the wrong size: {rec.label} is "
                            f"{raw.shape[1]}x{raw.shape[0]}, its image {rec.image.name} is {w}x{h}")
        ignore = self.ignore_index
        out = raw
        if self.spec.reduce_zero_label:
            out = raw - 1
            out[(raw == 0) | (raw == ignore)] = ignore
        n = len(self.classes.names)
        bad = (out != ignore) & ((out < 0) | (out >= n))
        if bad.any():
            values = sorted(int(v) for v in np.unique(raw[bad]))[:8]
            lo = 1 if self.spec.reduce_zero_label else 0
            raise OvssError(f"label map {rec.label} has values {values} outside {lo}..{n - 1 + lo}"
                            f" and {ignore} (ignore) for data set {self.name}")
        return out.astype(np.uint8)

    def image_labels(self, i: int) -> list[int]:
        """Sorted label values present in image i: from the list file if one was given (or in
        ``labels="image"`` mode), else derived from the dense label map."""
        rec = self._records[i]
        if self._listed is not None:
            if rec.id not in self._listed:
                raise OvssError(f"image-label file {self.image_labels_file} has no entry for "
                                f"image {rec.id!r}")
            return list(self._listed[rec.id])
        if rec.id not in self._present:
            values = np.unique(self.label(i))
            self._present[rec.id] = [int(v) for v in values if v != self.ignore_index
                                     and not (self.classes.background and v == 0)]
        return list(self._present[rec.id])


def _check_listed_id(image_id: str, split_file: Path, line: int) -> None:
    """A split list names images inside the data root: no absolute path, no ``..``, no
    drive or home prefix (checked on the text, so a data root that is itself a link works)."""
    parts = image_id.replace("\\", "/").split("/")
    if (image_id.startswith(("/", "\\", "~")) or ".." in parts or ":" in parts[0]
            or "\0" in image_id):
        raise OvssError(f"split file {split_file} line {line}: {image_id!r} points outside the "
                        "data root (give image ids, not paths)")


def _list_records(spec: DatasetSpec, root: Path, split: str) -> list[Record]:
    layout = LAYOUTS[spec.layout]
    where = spec.splits.get(split, "")
    if spec.layout != FOLDER and split not in spec.splits:
        raise OvssError(f"data set {spec.name} has no split {split!r}: choose one of "
                        f"{', '.join(spec.splits)}")
    image_dir = root / layout.image_dir.format(split=where)
    label_dir = root / layout.label_dir.format(split=where)
    if layout.split_list:
        split_file = root / where
        if not split_file.is_file():
            raise OvssError(f"split file {split_file} not found (data set {spec.name}, "
                            f"split {split})")
        ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        if not ids:
            raise OvssError(f"split file {split_file} lists no images")
        for n, line in enumerate(split_file.read_text().splitlines(), 1):
            if line.strip():
                _check_listed_id(line.strip(), split_file, n)
        suffix = layout.image_suffixes[0]
        records = [Record(i, image_dir / f"{i}{suffix}", label_dir / f"{i}{layout.label_suffix}")
                   for i in ids]
        for r in records:
            if not r.image.is_file():
                raise OvssError(f"image {r.image} listed in {split_file} not found")
        return records
    if not image_dir.is_dir():
        raise OvssError(f"image folder {image_dir} not found (data set {spec.name}, "
                        f"split {split})")
    files = image_dir.glob("*/*" if layout.nested else "*")
    records, seen = [], {}
    for f in sorted(files):
        name = f.name.lower()
        suffix = next((s for s in layout.image_suffixes if name.endswith(s.lower())), None)
        if suffix is None or not f.is_file():
            continue
        image_id = f.name[: len(f.name) - len(suffix)]
        if image_id in seen:
            raise OvssError(f"two images share the name {image_id!r}: {seen[image_id]} and {f}")
        seen[image_id] = f
        sub = f.parent.relative_to(image_dir)
        records.append(Record(image_id, f, label_dir / sub / f"{image_id}{layout.label_suffix}"))
    if not records:
        raise OvssError(f"no images ({', '.join(layout.image_suffixes)}) in {image_dir}")
    return records


def open_dataset(name: str, root: str | os.PathLike, split: str = "val", labels: str = "dense",
                 image_labels_file: str | os.PathLike | None = None,
                 max_images: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> SegDataset:
    """Open data set ``name`` (``conf/datasets/<name>.yaml``, or ``folder``) stored at ``root``.

    labels:            "dense" (label maps; every image must have one) or "image" (label-free:
                       image-level labels from ``image_labels_file``, default
                       ``root/image_labels.json``; ``label(i)`` raises DenseLabelsForbidden).
    image_labels_file: also in dense mode, the image-level labels then come from this file.
    max_images:        keep only the first N images of the split.
    """
    if labels not in LABEL_MODES:
        raise OvssError(f"labels={labels!r}: choose 'dense' or 'image'")
    spec = None if name == FOLDER else load_spec(name)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        what = "is not a directory" if root_path.exists() else "does not exist"
        raise OvssError(f"data root {root_path} {what} (data set {name})")
    if spec is None:
        spec = folder_spec(root_path)
    records = _list_records(spec, root_path, split)
    if max_images is not None:
        if max_images < 1:
            raise OvssError(f"max_images={max_images}: must be at least 1")
        records = records[:max_images]
    if labels == "dense":
        for r in records:
            if not r.label.is_file():
                raise OvssError(f"image {r.image} has no label map (expected {r.label})")
    listed, labels_path = None, None
    if image_labels_file is not None or labels == "image":
        labels_path = Path(image_labels_file) if image_labels_file is not None \
            else root_path / "image_labels.json"
        listed = read_image_labels(labels_path, spec.class_set())
    return SegDataset(spec, root_path, split, records, labels, listed, labels_path, cache_bytes)
