"""Run an exported (tuned) config on new images.

    python -m methods.infer --config conf/tuned/clipseg-openai-vit-b16-voc21.yaml \\
        --image cat.jpg --classes "cat,dog" --out cat.png

writes the label map (PNG, value i = i-th class, 0 = background when the config's data set has
one) and ``<out stem>_overlay.png``. From Python: ``methods.load_segmenter(path)(image, classes)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from methods import get_segmenter_class
from methods.base import ClassSet, OvssError, check_image

REQUIRED = ("method", "backbone", "settings", "params")


class TunedSegmenter:
    """A segmenter with its tuned knobs: ``seg(image, ["cat", "dog"]) -> HxW int64``."""

    def __init__(self, config: Mapping[str, Any], device: str | None = None):
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise OvssError(f"tuned config lacks {', '.join(missing)}")
        self.config = dict(config)
        self.device = device or ("cuda" if _cuda() else "cpu")
        cls = get_segmenter_class(config["method"])
        self.segmenter = cls.from_spec(config["backbone"], config["settings"], self.device)
        self.params = dict(config["params"])
        classes = config.get("classes") or {}
        self.background = bool(classes.get("background", False))

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | None = None,
                  tracking_uri: str | None = None) -> TunedSegmenter:
        if str(path).startswith("models:/"):  # a registered model (search.model); MLflow only here
            from search.model import config_from_model_uri

            return cls(config_from_model_uri(str(path), tracking_uri), device)
        path = Path(path)
        if not path.is_file():
            raise OvssError(f"tuned config {path} not found")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise OvssError(f"tuned config {path}: not valid YAML "
                            f"({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise OvssError(f"tuned config {path}: expected a mapping")
        return cls(config, device)

    def class_set(self, classes: Sequence[str] | ClassSet) -> ClassSet:
        if isinstance(classes, ClassSet):
            return classes
        return ClassSet.from_names(list(classes), background=self.background)

    def __call__(self, image: np.ndarray, classes: Sequence[str] | ClassSet,
                 present: Sequence[int] | None = None) -> np.ndarray:
        image = check_image(image)
        cs = self.class_set(classes)
        return np.asarray(self.segmenter.segment(image, cs, self.params, present))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map, n x 3 uint8 (label 0 black)."""
    cmap = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(label_map: np.ndarray) -> np.ndarray:
    """HxW int label map -> HxWx3 uint8 colours (255 = ignore shown white)."""
    lm = np.asarray(label_map).astype(np.int64)
    pal = palette(int(lm[lm != 255].max(initial=0)) + 1)
    out = np.full((*lm.shape, 3), 255, np.uint8)
    valid = lm != 255
    out[valid] = pal[lm[valid]]
    return out


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + colorize(label_map) * alpha).astype(np.uint8)


def save_label_map(label_map: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    lm = np.asarray(label_map)
    arr = lm.astype(np.uint8) if lm.max(initial=0) < 256 else lm.astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.infer",
                                description="Segment an image with a tuned config.")
    p.add_argument("--config", required=True, help="exported YAML (python -m search.export) or "
                   "a registered model models:/NAME/VERSION")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: "
                   "$MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    p.add_argument("--image", required=True, help="input image (jpg, png, ...)")
    p.add_argument("--classes", required=True, help='comma-separated class names: "cat,dog"')
    p.add_argument("--out", required=True, help="output label map PNG")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    try:
        from methods.io import load_image

        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not names:
            raise OvssError("--classes is empty: give at least one class name")
        image = load_image(args.image)
        seg = TunedSegmenter.from_file(args.config, args.device, args.tracking_uri)
        cs = seg.class_set(names)
        pred = seg(image, cs)
        out = Path(args.out)
        save_label_map(pred, out)
        from PIL import Image

        Image.fromarray(overlay(image, pred)).save(out.with_name(out.stem + "_overlay.png"))
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {cs.names[i]: int((pred == i).sum()) for i in np.unique(pred) if i < len(cs.names)}
    print(f"wrote {out} ({pred.shape[1]}x{pred.shape[0]}); pixels per class: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
