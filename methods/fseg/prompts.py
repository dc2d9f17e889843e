"""From grid maps to SAM prompts and from SAM masks to one label map (paper: VGM + SAM).

Geometry: a token grid gh x gw covers the *view* box ``(y0, x0, bh, bw)`` of the original image
(in pixels; LLaVA-1.5 pads to a square, so y0 or x0 is negative and the box is larger than the
image; the HF centre crop gives a box inside the image; LLaVA-1.6 covers the whole image).

Choices (UNVERIFIED, knobs in conf/methods/fseg.yaml; docs/fseg.md):

- de-noising (``morph``): ``open_close`` = opening then closing with a ``kernel`` x ``kernel``
  square at image resolution (``kernel: 0`` skips it), or ``close_open``;
- connected components are 8-connected; components smaller than ``min_area`` (fraction of the
  image) are dropped; at most ``max_points`` components are kept, largest first (equal areas:
  the one whose bounding box starts higher, then further left, then by centroid), and the points
  are listed in that order;
- each kept component's centroid is a positive point (``snap_centroid``: a centroid outside its
  component is moved to the component's nearest pixel); the box is the smallest box holding
  every kept component, ``[x0, y0, x1, y1]`` with inclusive pixel edges;
- ``empty: raw``: when de-noising leaves no component, the raw mask's components are used;
  ``drop``: the class then gets no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MORPHS = ("open_close", "close_open")
MERGES = ("activation", "score", "area_asc", "order")


def upsample_to_image(maps: torch.Tensor, view: tuple[int, int, int, int],
                      image_size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """C x gh x gw grid maps -> C x H x W on the image: resized to the view box, then cropped /
    placed (pixels outside the view are 0). ``mode``: bilinear (align_corners=False) or nearest."""
    y0, x0, bh, bw = view
    h, w = image_size
    kw = {"align_corners": False} if mode == "bilinear" else {}
    box = F.interpolate(maps[None].float(), size=(bh, bw), mode=mode, **kw)[0]
    out = box.new_zeros((maps.shape[0], h, w))
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + bh), min(w, x0 + bw)
    out[:, ys:ye, xs:xe] = box[:, ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def denoise(mask: np.ndarray, kernel: int, morph: str = "open_close") -> np.ndarray:
    """Morphological de-noising of a binary H x W mask (bool in, bool out)."""
    if kernel <= 1:
        return mask.astype(bool)
    if morph not in MORPHS:
        raise ValueError(f"morph must be one of {MORPHS}, got {morph!r}")
    k = np.ones((kernel, kernel), np.uint8)
    ops = ((cv2.MORPH_OPEN, cv2.MORPH_CLOSE) if morph == "open_close"
           else (cv2.MORPH_CLOSE, cv2.MORPH_OPEN))
    m = mask.astype(np.uint8)
    for op in ops:
        m = cv2.morphologyEx(m, op, k)
    return m.astype(bool)


@dataclass
class Prompts:
    """SAM prompts in original-image pixels: points P x 2 (x, y) float, box [x0, y0, x1, y1]."""

    points: np.ndarray
    box: np.ndarray


def components(mask: np.ndarray, min_area: float, max_points: int,
               snap: bool = False) -> Prompts | None:
    """Centroids of the kept 8-connected components and their joint bounding box (None if no
    component is kept). mask: H x W bool; ``min_area``: fraction of H * W."""
    _n, labels, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=8)
    area = stats[1:, cv2.CC_STAT_AREA]
    rank = np.lexsort((cents[1:, 0], cents[1:, 1], stats[1:, cv2.CC_STAT_LEFT],
                       stats[1:, cv2.CC_STAT_TOP], -area))   # OpenCV's label order is no rule
    keep = [i + 1 for i in rank if area[i] >= min_area * mask.size][:max(1, int(max_points))]
    if not keep:
        return None
    points, boxes = [], []
    for c in keep:
        cx, cy = cents[c]
        if snap:
            iy, ix = round(cy), round(cx)
            if labels[min(iy, mask.shape[0] - 1), min(ix, mask.shape[1] - 1)] != c:
                ys, xs = np.nonzero(labels == c)
                j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
                cx, cy = float(xs[j]), float(ys[j])
        points.append((cx, cy))
        x, y, w, h = stats[c, :4]
        boxes.append((x, y, x + w - 1, y + h - 1))
    b = np.array(boxes, dtype=np.float64)
    box = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
    return Prompts(np.array(points, dtype=np.float64), box)


def sam_prompts(mask: np.ndarray, kernel: int, morph: str, min_area: float, max_points: int,
                snap: bool, empty: str) -> Prompts | None:
    """M_r^c (H x W bool) -> de-noised -> :func:`components`, with the ``empty`` fallback."""
    out = components(denoise(mask, kernel, morph), min_area, max_points, snap)
    if out is None and empty == "raw" and mask.any():
        out = components(mask, 0.0, max_points, snap)
    return out


def merge_masks(masks: list[np.ndarray], priority: list[float], labels: list[int],
                fill: np.ndarray) -> np.ndarray:
    """Per-class binary masks -> one H x W int64 label map. Where masks overlap the higher
    ``priority`` wins (ties: the earlier mask); pixels no mask covers take ``fill``."""
    out = fill.astype(np.int64).copy()
    order = sorted(range(len(masks)), key=lambda i: (priority[i], -i))
    for i in order:
        out[masks[i]] = labels[i]
    return out
