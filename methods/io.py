"""Reading images and label maps from disk, with one-line errors that name the file.

``load_image`` always returns ``HxWx3 uint8 RGB in [0, 255]`` whatever is on disk (grayscale,
palette, RGBA, CMYK, 16-bit), with the EXIF orientation applied, as a photo viewer shows it.
``load_label`` returns ``HxW int64`` label values (a palette PNG's indices, never its colours).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from methods.base import OvssError

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
                Image.DecompressionBombError)
#: EXIF orientations (tag 0x0112) that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode ``path`` (a truncated file fails here, not later)."""
    p = Path(path)
    if not p.is_file():
        reason = "is a directory" if p.is_dir() else "no such file"
        raise OvssError(f"cannot read {what} {p}: {reason}")
    try:
        img = Image.open(p)
        img.load()
    except _READ_ERRORS as e:
        raise OvssError(f"cannot read {what} {p}: {_reason(e)}") from None
    return img


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8. Alpha is dropped (as PIL/OpenCV pipelines of the papers do)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit int) grayscale: map [0, 65535] to [0, 255].
        a = np.asarray(img, dtype=np.float64) / 257.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        grey = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``HxWx3 uint8 RGB in [0, 255]``, EXIF orientation applied.

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are converted. A missing,
    unreadable or corrupt file raises ``OvssError("cannot read image <path>: <reason>")``.
    """
    img = _open(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except _READ_ERRORS:  # a broken EXIF block: keep the pixels as stored
        pass
    try:
        return _to_rgb(img)
    except _READ_ERRORS as e:
        raise OvssError(f"cannot read image {path}: {_reason(e)}") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of the image as ``load_image`` returns it, read from the header only."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise OvssError(f"cannot read image {p}: no such file") from None
    except _READ_ERRORS as e:
        raise OvssError(f"cannot read image {p}: {_reason(e)}") from None
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def load_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label map as ``HxW int64`` label values.

    Palette ("P") PNGs give their indices, grayscale ("L", "I", "I;16") their values. A colour
    label map (RGB with differing channels) is refused: it needs a palette-to-index conversion.
    """
    img = _open(path, "label map")
    mode = img.mode
    if mode in ("P", "L", "1", "I", "F") or mode.startswith("I;16"):
        a = np.asarray(img)
    elif mode in ("RGB", "RGBA", "LA", "PA"):
        a = np.asarray(img)
        grey = bool((a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all())
        if mode in ("LA", "PA") or grey:
            a = a[..., 0]
        else:
            raise OvssError(f"cannot read label map {path}: it is a colour ({mode}) image; "
                            "save label values as a grayscale or palette PNG")
    else:
        raise OvssError(f"cannot read label map {path}: unsupported image mode {mode}")
    if a.dtype.kind == "f" and not (np.all(np.isfinite(a)) and np.all(a == np.rint(a))):
        raise OvssError(f"cannot read label map {path}: it holds non-integer values")
    return np.ascontiguousarray(a.astype(np.int64))
