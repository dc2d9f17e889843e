"""Reading images and label maps from disk, with one-line errors that name the file.

``load_image`` always returns ``HxWx3 uint8 RGB in [0, 255]`` whatever is on disk (grayscale,
palette, RGBA, CMYK, 16-bit), with the EXIF orientation applied, as a photo viewer shows it.
``load_label`` returns ``HxW int64`` label values (a palette PNG's indices, never its colours).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from methods.base import OvssError

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
                Image.DecompressionBombError)
#: EXIF orientations (tag 0x0112) that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)
#: Largest image read (width x height): 8192 x 8192 = 67 MP. Above every benchmark image
#: (Cityscapes 2 MP) and most cameras; one HxW int64 label map of it is 512 MiB. A file that
#: declares more (a decompression bomb: a few KB of zlib that inflate to GBs) is refused from
#: its header, before any pixel is decoded. ``$OVSS_MAX_IMAGE_PIXELS`` changes it (PIL itself
#: refuses above 179 MP whatever it is).
MAX_IMAGE_PIXELS = 8192 * 8192


def max_image_pixels() -> int:
    """The pixel limit: ``$OVSS_MAX_IMAGE_PIXELS`` if set, else :data:`MAX_IMAGE_PIXELS`."""
    raw = os.environ.get("OVSS_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise OvssError(f"OVSS_MAX_IMAGE_PIXELS={raw!r}: expected a whole number of pixels") \
            from None
    if value < 1:
        raise OvssError(f"OVSS_MAX_IMAGE_PIXELS={raw!r}: must be at least 1")
    return value


def check_image_pixels(path: str | os.PathLike, width: int, height: int,
                       what: str = "image") -> None:
    """OvssError naming ``path`` when ``width x height`` is above :func:`max_image_pixels`."""
    limit = max_image_pixels()
    if width * height > limit:
        raise OvssError(f"{what} {path} is {width}x{height} ({_pixels(width * height)}), "
                        f"above the limit of {_pixels(limit)}: downscale it (or raise "
                        "$OVSS_MAX_IMAGE_PIXELS)")


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode ``path`` (a truncated file fails here, not later)."""
    p = Path(path)
    if not p.is_file():
        reason = "is a directory" if p.is_dir() else "no such file"
        raise OvssError(f"cannot read {what} {p}: {reason}")
    try:
        with warnings.catch_warnings():  # ours is the one pixel check (and one line of output)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
        try:
            check_image_pixels(p, *img.size, what=what)
        except OvssError:
            img.close()
            raise
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
        with img:
            w, h = img.size
            check_image_pixels(p, w, h)
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
