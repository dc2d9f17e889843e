"""Mean intersection over union from a confusion matrix, as mmsegmentation computes it.

Pixels whose ground truth is ``ignore_index`` are left out. Per class c, summed over all images:
``IoU_c = |pred = c and gt = c| / |pred = c or gt = c|``, NaN where that union is empty (class
absent from both); ``mIoU`` is the NaN-ignoring mean; ``aAcc`` the fraction of counted pixels
predicted right.

    python -m rewards.miou --pred PRED_DIR --gt GT_DIR --num-classes 21 [--reduce-zero-label]

pairs ``PRED_DIR/<stem>.png`` with ``GT_DIR/<stem>.png`` and prints JSON (``miou``, ``aacc``,
``per_class_iou``) as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from methods.base import OvssError


def _as_int_array(x: Any, what: str) -> np.ndarray:
    """numpy or torch (any device) -> integer numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.rint(a)):
            raise OvssError(f"{what}: expected integer label values, got non-integer floats")
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise OvssError(f"{what}: expected an integer label map, got dtype {a.dtype}")
    return a


class ConfusionMatrix:
    """``mat[g, p]``: number of counted pixels with ground truth g predicted as p."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise OvssError(f"num_classes={num_classes}: must be at least 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: Any, gt: Any) -> ConfusionMatrix:
        """Add one image. pred, gt: HxW integer label maps (numpy or torch), same shape.

        pred values must lie in ``[0, num_classes)``; gt values too, or equal ``ignore_index``.
        """
        p = _as_int_array(pred, "prediction")
        g = _as_int_array(gt, "label map")
        if p.shape != g.shape:
            raise OvssError(f"prediction of shape {p.shape} does not match the label map "
                            f"of shape {g.shape}")
        n = self.num_classes
        if p.size and (p.min() < 0 or p.max() >= n):
            bad = np.unique(p[(p < 0) | (p >= n)])[:5].tolist()
            raise OvssError(f"prediction has values {bad} outside 0..{n - 1}")
        valid = g != self.ignore_index
        gv = g[valid].astype(np.int64)
        if gv.size and (gv.min() < 0 or gv.max() >= n):
            bad = np.unique(gv[(gv < 0) | (gv >= n)])[:5].tolist()
            raise OvssError(f"label map has values {bad} outside 0..{n - 1} and "
                            f"{self.ignore_index} (ignore)")
        idx = gv * n + p[valid].astype(np.int64)
        self.mat += np.bincount(idx, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same classes (e.g. from another worker)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise OvssError(f"cannot merge a {other.num_classes}-class confusion matrix into "
                            f"a {self.num_classes}-class one")
        self.mat += other.mat
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU, float64 of length num_classes, NaN where the union is empty."""
        inter = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - np.diag(self.mat)
        out = np.full(self.num_classes, np.nan)
        np.divide(inter, union, out=out, where=union > 0)
        return out

    def acc(self) -> np.ndarray:
        """Per-class pixel accuracy (recall), NaN where the class has no labelled pixel."""
        label_area = self.mat.sum(1)
        out = np.full(self.num_classes, np.nan)
        np.divide(np.diag(self.mat).astype(np.float64), label_area, out=out,
                  where=label_area > 0)
        return out

    def miou(self) -> float:
        """NaN-ignoring mean of ``iou()``; NaN when every class is NaN."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan

    def aacc(self) -> float:
        """Overall pixel accuracy; NaN when no pixel was counted."""
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else math.nan

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready ``{"miou", "aacc", "per_class_iou"}`` (NaN -> None).

        per_class_iou: ``{name: iou}`` with ``class_names``, else a list indexed by class.
        """
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        ious = [clean(v) for v in self.iou()]
        per_class: Any = ious
        if class_names is not None:
            if len(class_names) != self.num_classes:
                raise OvssError(f"{len(class_names)} class names for a {self.num_classes}-class "
                                "confusion matrix")
            per_class = dict(zip(class_names, ious))
        return {"miou": clean(self.miou()), "aacc": clean(self.aacc()),
                "per_class_iou": per_class}


class MiouAccumulator:
    """The ``--reward miou`` accumulator: ``update`` per image, ``value()`` = mIoU in [0, 1]."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None):
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.class_names = list(class_names) if class_names is not None else None

    def update(self, image: Any, pred: Any, label: Any = None, present: Any = None) -> None:
        """pred, label: HxW integer label maps. ``image`` and ``present`` are not used."""
        if label is None:
            raise OvssError("the mIoU reward needs dense label maps (label=None): use "
                            "--reward clip for a label-free search")
        self.cm.update(pred, label)

    def value(self) -> float:
        m = self.cm.miou()
        return 0.0 if math.isnan(m) else m

    def details(self) -> dict[str, float]:
        """``iou/<class name>`` per class (NaN where absent from both) and ``aacc``."""
        names = self.class_names or [str(i) for i in range(self.cm.num_classes)]
        out = {f"iou/{name}": float(v) for name, v in zip(names, self.cm.iou())}
        out["aacc"] = self.cm.aacc()
        return out


# --- CLI ---------------------------------------------------------------------------------------
def _pairs(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    for d, what in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not d.is_dir():
            raise OvssError(f"{what} {d}: not a directory")
    preds = {p.stem: p for p in sorted(pred_dir.glob("*.png"))}
    gts = {p.stem: p for p in sorted(gt_dir.glob("*.png"))}
    if not gts:
        raise OvssError(f"--gt {gt_dir}: no .png label maps")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise OvssError(f"no prediction in {pred_dir} for {len(missing)} label map(s): "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(set(preds) - set(gts))
    if extra:
        raise OvssError(f"no label map in {gt_dir} for {len(extra)} prediction(s): "
                        f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    return [(s, preds[s], gts[s]) for s in sorted(gts)]


def evaluate_dirs(pred_dir: Path, gt_dir: Path, num_classes: int, ignore_index: int = 255,
                  reduce_zero_label: bool = False) -> tuple[ConfusionMatrix, int]:
    """Confusion matrix over every ``<stem>.png`` pair; OvssError naming the first bad file."""
    from methods.io import load_label

    cm = ConfusionMatrix(num_classes, ignore_index)
    pairs = _pairs(pred_dir, gt_dir)
    for _, pred_path, gt_path in pairs:
        pred, gt = load_label(pred_path), load_label(gt_path)
        if pred.shape != gt.shape:
            raise OvssError(f"size mismatch: {pred_path} is {pred.shape[1]}x{pred.shape[0]}, "
                            f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        if reduce_zero_label:
            reduced = gt - 1
            reduced[(gt == 0) | (gt == ignore_index)] = ignore_index
            gt = reduced
        try:
            cm.update(pred, gt)
        except OvssError as e:
            bad = pred_path if str(e).startswith("prediction") else gt_path
            raise OvssError(f"{bad}: {e}") from None
    return cm, len(pairs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewards.miou",
                                description="mIoU of predicted label maps against ground truth.")
    p.add_argument("--pred", required=True, help="folder of predicted label maps (<stem>.png)")
    p.add_argument("--gt", required=True, help="folder of ground-truth label maps (<stem>.png)")
    p.add_argument("--num-classes", type=int, required=True, help="number of classes")
    p.add_argument("--ignore-index", type=int, default=255, help="ignored label (default 255)")
    p.add_argument("--reduce-zero-label", action="store_true",
                   help="ground truth 0 -> ignore, i -> i-1 (ADE20K, Context59, VOC20)")
    args = p.parse_args(argv)
    try:
        cm, n = evaluate_dirs(Path(args.pred), Path(args.gt), args.num_classes,
                              args.ignore_index, args.reduce_zero_label)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = cm.to_dict()
    print(f"{n} image pairs, {int(cm.mat.sum())} labelled pixels")
    print(json.dumps({**result, "images": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
