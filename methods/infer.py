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

from methods.base import SAME_CLASS, ClassSet, OvssError, check_image, class_clash
from methods.registry import get_segmenter_class, method_module_name

REQUIRED = ("method", "backbone", "settings", "params")


class TunedSegmenter:
    """A segmenter with its tuned knobs: ``seg(image, ["cat", "dog"]) -> HxW int64``."""

    def __init__(self, config: Mapping[str, Any], device: str | None = None,
                 where: str = "tuned config"):
        check_tuned_config(config, where)
        self.config = dict(config)
        self.device = check_device(device) if device else ("cuda" if _cuda() else "cpu")
        cls = get_segmenter_class(config["method"])
        self.segmenter = cls.from_spec(config["backbone"], config["settings"], self.device)
        self.params = dict(config["params"])
        classes = config.get("classes") or {}
        self.background = bool(classes.get("background", False))

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | None = None,
                  tracking_uri: str | None = None) -> TunedSegmenter:
        if str(path).startswith("models:/"):  # a registered model; MLflow only here
            from methods.mlflow_store import config_from_model_uri

            return cls(config_from_model_uri(str(path), tracking_uri), device)
        return cls(read_config_file(path), device, where=f"tuned config {path}")

    def class_set(self, classes: Sequence[str] | ClassSet) -> ClassSet:
        """The label space of ``classes`` (with the config's background class); OvssError when
        two are one class (``methods.base.class_key``) or the method could not tell them apart
        (``Segmenter.check_classes``)."""
        cs = classes if isinstance(classes, ClassSet) else ClassSet.from_names(
            list(classes), background=self.background)
        type(self.segmenter).check_classes(self.config["settings"], cs)
        return cs

    def __call__(self, image: np.ndarray, classes: Sequence[str] | ClassSet,
                 present: Sequence[int] | None = None) -> np.ndarray:
        image = check_image(image)
        cs = self.class_set(classes)
        return np.asarray(self.segmenter.segment(image, cs, self.params, present))


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A tuned config YAML as a dict; one-line OvssError when missing, not YAML or no mapping."""
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
    return config


def check_tuned_config(config: Mapping[str, Any], where: str = "tuned config") -> None:
    """Before any weights load: the method is known and ``params`` holds exactly its knobs
    (``conf/methods/<method>.yaml`` defaults), each of the kind of its default. A config of
    another method, or of an older spec, fails here naming the knob."""
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise OvssError(f"{where} lacks {', '.join(missing)}")
    method, params = config["method"], config["params"]
    if not isinstance(method, str):
        raise OvssError(f"{where}: method must be a name, got {method!r}")
    method_module_name(method)  # unknown method: one line naming the known ones (no import)
    if not isinstance(params, Mapping):
        raise OvssError(f"{where}: params must be a mapping of knob: value")
    from methods.spec import check_knob_value, load_method_spec

    spec = load_method_spec(method)
    backbone = config["backbone"] if isinstance(config["backbone"], Mapping) else {}
    bb = spec.backbones.get(str(backbone.get("name")))
    defaults = {**spec.defaults, **(bb.defaults if bb else {})}
    space = {**spec.space, **(bb.space if bb else {})}
    lacking = [k for k in defaults if k not in params]
    if lacking:
        raise OvssError(f"{where}: params lack knob(s) {', '.join(lacking)} of method {method}")
    foreign = [k for k in params if k not in defaults]
    if foreign:
        raise OvssError(f"{where}: {', '.join(map(str, foreign))} is not a knob of method "
                        f"{method} (a config of another method?)")
    for k, v in params.items():  # the kind only: a --set value may lie outside the space
        check_knob_value(k, v, defaults[k], space.get(k), f"{where}: params.{k}", kind_only=True)


def presence_for_inference(config: Mapping[str, Any], classes: ClassSet,
                           given: str | None) -> list[int] | None:
    """The ``present`` classes for inference: by default what the config was tuned with
    (``settings.presence_source``: ``model`` -> None, the method finds them itself); a config
    tuned on image labels or ground truth has none at inference, and ``--present`` overrides;
    both of these are said on stderr."""
    source = (config.get("settings") or {}).get("presence_source", "model")
    if given is None:
        if source != "model":
            print(f"note: this config was tuned with presence_source={source}; no --present "
                  "given, so the method finds the classes in the image itself", file=sys.stderr)
        return None
    names = [c.strip() for c in given.split(",") if c.strip()]
    unknown = [n for n in names if n not in classes.names]
    if not names or unknown:
        raise OvssError(f"--present {given!r}: give names from --classes"
                        + (f" (not in it: {', '.join(unknown)})" if unknown else ""))
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise OvssError(f"--present {given!r}: {twice[0]!r} is given twice")
    if source == "model":
        print("note: this config was tuned with presence_source=model; using the given "
              "--present classes instead of the method's own", file=sys.stderr)
    return sorted(classes.names.index(n) for n in names)


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that torch can use here; OvssError naming it otherwise."""
    import torch

    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not _cuda():
            raise OvssError(f"--device {device}: no CUDA GPU is visible here "
                            "(torch.cuda.is_available() is False); use --device cpu")
        n = torch.cuda.device_count()
        if device != "cuda" and int(device[5:]) >= n:
            raise OvssError(f"--device {device}: only {n} CUDA GPU(s) are visible "
                            f"(cuda:0..cuda:{n - 1})")
        return device
    if device == "mps" and torch.backends.mps.is_available():
        return device
    raise OvssError(f"--device {device!r}: choose cpu, cuda or cuda:N")


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


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an HxW (uint8/uint16) or HxWx3 uint8 array as a PNG, atomically."""
    from PIL import Image

    from methods.io import atomic_write

    image = Image.fromarray(array)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_label_map(label_map: np.ndarray, path: str | os.PathLike) -> None:
    """HxW int label map -> PNG of its values (uint8, or uint16 past 255), written atomically."""
    lm = np.asarray(label_map)
    save_png(lm.astype(np.uint8) if lm.max(initial=0) < 256 else lm.astype(np.uint16), path)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the CLIs
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = _OneLineParser(prog="python -m methods.infer",
                       description="Segment an image with a tuned config.")
    p.add_argument("--config", required=True, help="exported YAML (python -m search.export) or "
                   "a registered model models:/NAME/VERSION")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: "
                   "$MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    p.add_argument("--image", required=True, help="input image (jpg, png, ...)")
    p.add_argument("--classes", required=True, help='comma-separated class names: "cat,dog"')
    p.add_argument("--out", required=True, help="output label map PNG")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--present", help="comma-separated image-level labels (a subset of "
                   "--classes) handed to the method as the classes in the image; default: as "
                   "the config was tuned (presence_source model: the method finds them itself)")
    args = p.parse_args(argv)
    try:
        from methods.io import load_image

        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not names:
            raise OvssError("--classes is empty: give at least one class name")
        clash = class_clash(names)
        if clash is not None:
            i, j, _ = clash
            raise OvssError(f"--classes {args.classes!r}: {names[j]!r} (name {j + 1}) repeats "
                            f"{names[i]!r} (name {i + 1}); {SAME_CLASS}")
        out = Path(args.out)
        if out.is_dir() or out.suffix.lower() != ".png":
            raise OvssError(f"--out {out}: give a .png file path (the label map is a PNG)")
        if args.device:
            check_device(args.device)
        image = load_image(args.image)  # corrupt, or above the pixel limit: refused here
        seg = TunedSegmenter.from_file(args.config, args.device, args.tracking_uri)
        try:
            cs = seg.class_set(names)
        except OvssError as e:
            raise OvssError(f"--classes {args.classes!r}: {e}") from None
        present = presence_for_inference(seg.config, cs, args.present)
        pred = seg(image, cs, present)
        save_label_map(pred, out)
        save_png(overlay(image, pred), out.with_name(out.stem + "_overlay.png"))
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {cs.names[i]: int((pred == i).sum()) for i in np.unique(pred) if i < len(cs.names)}
    print(f"wrote {out} ({pred.shape[1]}x{pred.shape[0]}); pixels per class: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
