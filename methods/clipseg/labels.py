"""From per-name window cosines to a label map: separable upsampling, the max over each class's
names, and the background rules of the family's protocols."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def upsample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """names x (A gh) x (B gw) mosaic -> H x names x W: ``rows @ x_c @ cols^T`` for every name
    as two matrix products, the cheaper order first."""
    c, a, b = x.shape
    h, w = rows.shape[0], cols.shape[0]
    if h * b * (a + w) <= a * w * (b + h):
        y = (rows @ x.transpose(0, 1).reshape(a, c * b)).view(h * c, b)      # (H names) x b
        return (y @ cols.T).view(h, c, w)
    y = (x.reshape(c * a, b) @ cols.T).view(c, a, w).transpose(0, 1).reshape(a, c * w)
    return (rows @ y).view(h, c, w)


def names_to_classes(probs: torch.Tensor, name_class: Sequence[int]) -> torch.Tensor:
    """names x H x W probabilities -> classes x H x W, the max over each class's names."""
    owner = list(name_class)
    n_cls = max(owner) + 1
    if n_cls == len(owner):
        return probs
    rows = [[i for i, o in enumerate(owner) if o == c] for c in range(n_cls)]
    return torch.stack([probs[r[0]] if len(r) == 1 else probs[r].amax(0) for r in rows])


def labels_from_probs(probs: torch.Tensor, mode: str, threshold: float,
                      area: float | None = None) -> np.ndarray:
    """C x H x W class probabilities -> H x W int64 labels.

    mode ``none``: argmax. ``threshold``: foreground j is label j + 1, background where the best
    probability is below ``threshold``. ``query`` (C = all classes, class 0 = background):
    SCLIP's area rule first when ``area`` is set (classes 1.. whose argmax area is at most
    ``area`` times the area of all of them get probability 0), argmax, then background where
    the best probability is below ``threshold``.
    """
    if mode == "query" and area is not None:
        arg = probs.argmax(0)
        counts = torch.bincount(arg.flatten(), minlength=probs.shape[0])[1:].to(probs.dtype)
        keep = (counts > float(area) * counts.sum()).to(probs.dtype)
        probs = probs.clone()
        probs[1:] *= keep[:, None, None]
    top, arg = probs.max(0)
    if mode == "none":
        return arg.numpy().astype(np.int64)
    label = arg + 1 if mode == "threshold" else arg.clone()
    label[top < threshold] = 0
    return label.numpy().astype(np.int64)


def probs_to_labels(probs: torch.Tensor, background: bool, threshold: float) -> np.ndarray:
    """C_fg x H x W -> H x W int64 label values (our threshold rule, or argmax)."""
    return labels_from_probs(probs, "threshold" if background else "none", threshold)
