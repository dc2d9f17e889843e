"""Tiny generated data sets in the real on-disk layouts (tests and ``--preset smoke``).

Each image is a textured background (one or two "stuff" regions) with a few rectangles and
ellipses on it; the label map gives every shape its class. Each class is painted in a colour
derived from its readable name (sha256 of ``prompts[i][0]``), so a colour-matching method can
segment it. Sizes vary a little between images; VOC masks are palette PNGs with 255 (ignore)
borders around objects, as in the real data. Also written: ``image_labels.json`` (the file a
label-free search reads). Deterministic for a seed.

    root = make_dataset("voc", "/tmp/voc", n=8)      # then open_dataset("voc21", root)

Idempotent: a complete set carries a marker file (written last, after an atomic rename), and a
second call with the same arguments returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from methods.base import OvssError
from search.data.spec import FOLDER, LAYOUTS, DatasetSpec, load_spec

MARKER = ".ovss_synthetic.json"
FORMAT_VERSION = 1
FOLDER_CLASSES = ("background", "cat", "dog", "bird")


@dataclass(frozen=True)
class _Style:
    """What one layout's generated images show. Names are class names of ``dataset``."""

    dataset: str                   # spec that names the classes and their raw mask values
    stuff: tuple[str, ...]         # background regions (top, bottom)
    things: tuple[str, ...]        # shapes
    ignore_border: int = 0         # VOC: 255 band of this width around object boundaries
    unlabeled_strip: bool = False  # a strip of raw 255 (or raw 0 where that means "ignore")
    ids: str = "{i:06d}"


STYLES: dict[str, _Style] = {
    "voc": _Style("voc21", ("background",), ("aeroplane", "bird", "cat", "dog", "person",
                                             "car", "tvmonitor"), ignore_border=2,
                  ids="2007_{i:06d}"),
    "context": _Style("context60", ("sky", "grass", "wall", "background"),
                      ("person", "dog", "car", "bus", "tvmonitor", "chair"), ids="2008_{i:06d}"),
    "coco_object": _Style("coco_object", ("background",),
                          ("person", "dog", "cat", "car", "bus", "bottle"), ids="{i:012d}"),
    "coco_stuff": _Style("coco_stuff164k", ("sky-other", "grass", "wall-other", "road"),
                         ("person", "dog", "car", "bus"), unlabeled_strip=True, ids="{i:012d}"),
    "ade20k": _Style("ade20k", ("wall", "sky", "floor", "grass"),
                     ("person", "car", "bed", "chair", "table"), unlabeled_strip=True,
                     ids="ADE_val_{i:08d}"),
    "cityscapes": _Style("cityscapes", ("sky", "road", "building", "vegetation"),
                         ("car", "person", "bicycle", "bus"), unlabeled_strip=True,
                         ids="{city}_{i:06d}_000019"),
    FOLDER: _Style(FOLDER, ("background",), FOLDER_CLASSES[1:], ids="img_{i:03d}"),
}
CITIES = ("frankfurt", "lindau", "munster")


def class_colour(name: str) -> np.ndarray:
    """RGB float colour in [0, 255] of a class, from its readable name."""
    h = hashlib.sha256(name.encode()).digest()
    return np.array([h[0], h[1], h[2]], np.float64)


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (index i -> RGB), flattened for ``Image.putpalette``."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


@cache
def _spec(style: _Style) -> DatasetSpec:
    if style.dataset == FOLDER:
        return DatasetSpec(name=FOLDER, layout=FOLDER, classes=list(FOLDER_CLASSES),
                           background=True)
    return load_spec(style.dataset)


def _paint(rng: np.random.Generator, shape: tuple[int, int], style: _Style,
           spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8) and its raw mask (HxW uint8 in the file's values)."""
    h, w = shape
    prompts = spec.prompts or [[c] for c in spec.classes]
    offset = 1 if spec.reduce_zero_label else 0          # raw value = class index + offset
    raw = {c: spec.classes.index(c) + offset for c in (*style.stuff, *style.things)}
    colour = {c: class_colour(prompts[spec.classes.index(c)][0]) for c in raw}

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    lab = np.zeros((h, w), np.uint8)
    stuff = list(rng.choice(len(style.stuff), size=min(2, len(style.stuff)), replace=False))
    horizon = int(h * rng.uniform(0.35, 0.65)) if len(stuff) > 1 else h
    for k, (top, bottom) in enumerate([(0, horizon), (horizon, h)][: len(stuff)]):
        name = style.stuff[stuff[k]]
        img[top:bottom] = colour[name]
        lab[top:bottom] = raw[name]
    freq, phase = rng.uniform(0.15, 0.5), rng.uniform(0, np.pi)
    img += (10 * np.sin(freq * xx + 0.5 * freq * yy + phase))[..., None]  # texture: stripes

    for _ in range(int(rng.integers(1, 4))):
        name = style.things[int(rng.integers(len(style.things)))]
        sh, sw = int(h * rng.uniform(0.2, 0.45)), int(w * rng.uniform(0.2, 0.45))
        y0, x0 = int(rng.integers(0, h - sh)), int(rng.integers(0, w - sw))
        if rng.random() < 0.5:
            inside = (yy >= y0) & (yy < y0 + sh) & (xx >= x0) & (xx < x0 + sw)
        else:
            cy, cx = y0 + sh / 2, x0 + sw / 2
            inside = ((yy - cy) / (sh / 2)) ** 2 + ((xx - cx) / (sw / 2)) ** 2 <= 1.0
        img[inside] = colour[name]
        lab[inside] = raw[name]
    img += rng.normal(0, 4, img.shape)

    if style.ignore_border:
        k = np.ones((2 * style.ignore_border + 1,) * 2, np.uint8)
        edge = cv2.dilate(lab, k) != cv2.erode(lab, k)
        lab[edge] = spec.ignore_index
    if style.unlabeled_strip:
        unlabeled = 0 if spec.reduce_zero_label else spec.ignore_index
        lab[-3:, :] = unlabeled
        img[-3:, :] = 20
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lab


def scene(layout: str, rng: np.random.Generator,
          shape: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, list[str]]:
    """One generated image (HxWx3 uint8) of ``layout``'s style and the readable names
    (``prompts[i][0]``) of the classes painted in it, background excluded: the image-caption
    pairs the toy CLIP is trained on (bench/toy_clip_train.py). Same painter as the data sets."""
    if layout not in STYLES:
        raise OvssError(f"unknown layout {layout!r}: choose one of {', '.join(STYLES)}")
    style = STYLES[layout]
    spec = _spec(style)
    img, lab = _paint(rng, shape, style, spec)
    prompts = spec.prompts or [[c] for c in spec.classes]
    offset = 1 if spec.reduce_zero_label else 0
    names = []
    for v in np.unique(lab).tolist():
        i = v - offset
        if v != spec.ignore_index and 0 <= i < len(spec.classes) and \
                spec.classes[i] != "background":
            names.append(prompts[i][0])
    return img, names


def _write(root: Path, layout: str, n: int, size: tuple[int, int], seed: int) -> None:
    style, lay = STYLES[layout], LAYOUTS[layout]
    spec = _spec(style)
    split = spec.splits.get("val", "")
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    ids, present = [], {}
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        image_id = style.ids.format(i=i, city=city)
        shape = (size[0] + 8 * (i % 3 - 1), size[1] + 8 * ((i // 3) % 3 - 1))
        img, lab = _paint(rng, shape, style, spec)
        sub = city if lay.nested else ""
        suffix = ".png" if layout == FOLDER and i % 2 else lay.image_suffixes[0]
        image_path = root / lay.image_dir.format(split=split) / sub / f"{image_id}{suffix}"
        label_path = root / lay.label_dir.format(split=split) / sub / \
            f"{image_id}{lay.label_suffix}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(image_path, **({"quality": 95} if suffix == ".jpg" else {}))
        mask = Image.fromarray(lab, mode="L")
        if layout == "voc":
            mask = mask.convert("P")
            mask.putpalette(palette)
        mask.save(label_path)
        ids.append(image_id)
        values = sorted(set(np.unique(lab).tolist()) - {spec.ignore_index})
        offset = 1 if spec.reduce_zero_label else 0
        present[image_id] = [spec.classes[v - offset] for v in values
                             if v - offset >= 0 and spec.classes[v - offset] != "background"]
    if lay.split_list:
        split_file = root / split
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{i}\n" for i in ids))
    if layout == FOLDER:
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in FOLDER_CLASSES))
    (root / "image_labels.json").write_text(json.dumps(present, indent=1) + "\n")


def _marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_dataset(layout: str, root: str | os.PathLike, n: int = 8,
                 size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Write ``n`` images of about ``size`` (H, W) in ``layout``'s on-disk layout under ``root``.

    layout: voc, context, coco_stuff, coco_object, ade20k, cityscapes or folder (see
    ``search.data.dataset_layout`` for a data set's layout). Returns ``root``.
    """
    if layout not in STYLES:
        raise OvssError(f"unknown layout {layout!r}: choose one of {', '.join(STYLES)}")
    if n < 1 or min(size) < 32:
        raise OvssError(f"synthetic data set needs n >= 1 and a size of at least 32x32, "
                        f"got n={n}, size={size}")
    root = Path(root)
    want = {"layout": layout, "n": n, "size": list(size), "seed": seed,
            "version": FORMAT_VERSION}
    if _marker(root) == want:
        return root
    if root.exists() and any(root.iterdir()) and _marker(root) is None:
        raise OvssError(f"{root} is not empty and holds no synthetic data set: "
                        "give an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, layout, n, size, seed)
        (tmp / MARKER).write_text(json.dumps(want) + "\n")
        if root.exists():
            if _marker(root) == want:         # another process finished first
                return root
            if any(root.iterdir()):             # ours (it has a marker), other arguments
                shutil.rmtree(root)
            else:
                root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            if _marker(root) != want:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
