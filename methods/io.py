"""Reading images and label maps from disk, and writing the files a user keeps.

``load_image`` always returns ``HxWx3 uint8 RGB in [0, 255]`` whatever is on disk (grayscale,
palette, RGBA, CMYK, 16-bit), with the EXIF orientation applied, as a photo viewer shows it.
``load_label`` returns ``HxW int64`` label values (a palette PNG's indices, never its colours).

``atomic_write`` is the one way files a user keeps (exported configs, inference label maps and
overlays, image-label lists, evidence cache entries) reach the disk: a reader sees the old file or
the whole new one, never a half-written one. ``private_dir`` makes a directory only its owner can
enter (Ray Tune's storage, whose pickles are unpickled on ``--resume``). ``pretrained_kwargs`` and
``weights_error`` are what every transformers ``from_pretrained`` of model weights passes and says:
safetensors only, unless the backbone entry sets ``allow_pickle_weights: true``.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

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


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Test hook: called with (temporary path, final path) after the data is on disk, just before
#: it is published.
_before_publish: Callable[[Path, Path], None] | None = None


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None], *,
                 overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` so that a reader only ever sees the old file or the whole new one.

    ``data``: bytes, str (written as UTF-8) or a function that writes to the binary file object
    it is given (``lambda f: image.save(f, format="PNG")``). The bytes go to a temporary file in
    the same directory, are flushed and fsynced, then renamed onto ``path``; on any failure the
    temporary file is removed and ``path`` is left as it was. The file's mode is ``0o666`` less
    the umask (the temporary file is created with that mode, so group/others read it when the
    umask says so); missing parent directories are created ``0o777`` less the umask.

    ``overwrite=False`` publishes with ``os.link``, which fails when ``path`` exists: the first
    writer wins, a later one discards its copy and gets ``False`` (write-once, safe for several
    processes writing the same file; on a file system without hard links it falls back to an
    existence check then a rename, which narrows the window but does not close it).
    Returns True when this call published ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if _before_publish is not None:
            _before_publish(tmp, path)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:  # a file system without hard links: check, then rename
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if path.exists():
                    return False
                os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) as a directory only its owner can enter: mode 0o700.

    An existing directory of ours is tightened to 0o700; one owned by another user is refused
    (``OvssError``), because what is read from it may be unpickled.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise OvssError(f"{path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OvssError(f"{path} belongs to another user (uid {st.st_uid}): give a directory "
                        "of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def pretrained_kwargs(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a transformers model ``from_pretrained`` of a backbone entry.

    ``use_safetensors=True`` (a pickled ``.bin`` checkpoint can run code when it is read) unless
    the entry sets ``allow_pickle_weights: true`` (``--set backbone.allow_pickle_weights=true``;
    transformers then reads ``.bin`` files with ``torch.load(weights_only=True)``), and the hub
    ``revision`` when the entry pins one. ``trust_remote_code`` is never passed (default off).
    """
    kw: dict[str, Any] = {"use_safetensors": not _flag(backbone.get("allow_pickle_weights"))}
    if backbone.get("revision") and not backbone.get("path"):
        kw["revision"] = str(backbone["revision"])
    return kw


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def weights_error(what: str, source: str, e: BaseException,
                  kwargs: Mapping[str, Any]) -> OvssError:
    """The one-line OvssError of a failed ``from_pretrained`` of model weights."""
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    if kwargs.get("use_safetensors") and "safetensors" in text:
        return OvssError(f"{what}: {source!r} has no safetensors weights (pickled .bin files "
                         "can run code when read): convert them with save_pretrained, or pass "
                         "--set backbone.allow_pickle_weights=true to read them with "
                         "weights_only=True")
    return OvssError(f"{what}: cannot load {source!r} ({type(e).__name__}: {text})")
