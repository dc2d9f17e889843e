"""Dense-inference geometry of the CLIP family (mmseg ``slide`` inference), as tensors.

1. The image is resized (bilinear, keep ratio) so that its short side is ``short_side`` and its
   long side at most 2048 (mmseg ``Resize(scale=(2048, short_side), keep_ratio=True)``).
2. Windows of ``window`` x ``window`` px slide with ``stride``; the last row/column of windows
   is shifted back to end at the image border; an image side shorter than the window gives one
   window of that side. A window side that is no multiple of the patch is zero-padded (after
   normalisation) at the bottom/right.
3. Each window's patch logits (gh x gw) are upsampled bilinearly (align_corners=False) to the
   padded window, cropped, summed into the resized image, divided by the number of windows
   covering each pixel, and resized bilinearly to the original image.

Step 3 is linear and separable (the window grid is a product of row and column offsets, so the
overlap count is a product too): ``out_c = Lr @ X_c @ Lc^T`` with X_c the (A gh) x (B gw)
mosaic of the window logits of class c. :func:`separable_upsampling` builds Lr (H x A gh) and
Lc (W x B gw) once per image; decode uses them, the straight reference (reference.py) does the
interpolations one by one with ``F.interpolate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WindowGrid:
    """Sliding windows over a resized image of ``size`` = (H', W') px.

    ys, xs:   top / left offsets (px) of the window rows / columns (A and B of them).
    wh, ww:   window height / width (px); ph, pw: padded to a patch multiple.
    gh, gw:   patch grid of one window.
    top, left: zero padding above / left of the window (px; ``pad_to`` only).
    """

    size: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    wh: int
    ww: int
    ph: int
    pw: int
    gh: int
    gw: int
    top: int = 0
    left: int = 0

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def resized_size(h: int, w: int, short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """(H', W') after the keep-ratio resize (mmseg rescale rule, rounded half up)."""
    scale = min(short_side / min(h, w), max_long / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> H'xW'x3 uint8, bilinear (cv2, as mmseg)."""
    if image.shape[:2] == size:
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _offsets(n: int, window: int, stride: int) -> tuple[tuple[int, ...], int]:
    win = min(window, n)
    grids = max(n - win + stride - 1, 0) // stride + 1
    offs = tuple(max(min(i * stride + win, n) - win, 0) for i in range(grids))
    return offs, win


def window_grid(size: tuple[int, int], window: int, stride: int, patch: int,
                pad_to: int | None = None) -> WindowGrid:
    """The sliding-window layout of a resized image of ``size`` = (H', W'); ``pad_to``: pad
    each window centred to a multiple of it (ProxyCLIP ``compute_padsize(H, W, 56)``)."""
    ys, wh = _offsets(size[0], window, stride)
    xs, ww = _offsets(size[1], window, stride)
    if pad_to:
        ph, pw = -(-wh // pad_to) * pad_to, -(-ww // pad_to) * pad_to
        return WindowGrid(size, ys, xs, wh, ww, ph, pw, ph // patch, pw // patch,
                          (ph - wh) // 2, (pw - ww) // 2)
    ph, pw = -(-wh // patch) * patch, -(-ww // patch) * patch
    return WindowGrid(size, ys, xs, wh, ww, ph, pw, ph // patch, pw // patch)


def window_batch(pixels: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """Cut the normalised image 3 x H' x W' into the windows: (A B) x 3 x ph x pw, row-major,
    zero-padded to the padded size (``grid.top`` / ``grid.left`` above / left, the rest below /
    right)."""
    crops = [pixels[:, y:y + grid.wh, x:x + grid.ww] for y in grid.ys for x in grid.xs]
    out = torch.stack(crops)
    if (grid.ph, grid.pw) != (grid.wh, grid.ww):
        out = F.pad(out, (grid.left, grid.pw - grid.ww - grid.left,
                          grid.top, grid.ph - grid.wh - grid.top))
    return out


def linear_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The n_out x n_in matrix of 1-D linear resizing (align_corners=False, no antialias), i.e.
    what ``F.interpolate(..., mode="bilinear")`` does along one axis. float32."""
    eye = torch.eye(n_in, dtype=torch.float32)[None]                  # 1 x n_in x n_in
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def _axis_operator(offs: tuple[int, ...], win: int, padded: int, g: int, n_resized: int,
                   n_out: int, before: int = 0) -> torch.Tensor:
    up = linear_resize_matrix(g, padded)[before:before + win]          # win x g
    place = torch.zeros(n_resized, len(offs) * g)
    for a, o in enumerate(offs):
        place[o:o + win, a * g:(a + 1) * g] += up
    count = torch.zeros(n_resized)
    for o in offs:
        count[o:o + win] += 1
    return linear_resize_matrix(n_resized, n_out) @ (place / count[:, None])


def separable_upsampling(grid: WindowGrid, out_size: tuple[int, int],
                         cells: tuple[int, int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lr (H x A gh) and Lc (W x B gw), float32, such that the family's window upsampling,
    overlap averaging and final resize of a mosaic X (A gh x B gw) is ``Lr @ X @ Lc^T``.
    ``cells``: a window's logit grid when it is not CLIP's (ProxyCLIP: the vision model's)."""
    gh, gw = cells or (grid.gh, grid.gw)
    lr = _axis_operator(grid.ys, grid.wh, grid.ph, gh, grid.size[0], out_size[0], grid.top)
    lc = _axis_operator(grid.xs, grid.ww, grid.pw, gw, grid.size[1], out_size[1], grid.left)
    return lr, lc


def mosaic(window_logits: torch.Tensor, a: int, b: int, gh: int, gw: int) -> torch.Tensor:
    """(A B) x P x C window patch logits (windows row-major, P = gh gw) -> C x (A gh) x (B gw)
    mosaic: the window blocks side by side in their grid order."""
    c = window_logits.shape[-1]
    x = window_logits.reshape(a, b, gh, gw, c)
    return x.permute(4, 0, 2, 1, 3).reshape(c, a * gh, b * gw)


def interpolate_pos_embed(pos: torch.Tensor, native: tuple[int, int],
                          grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh0 gw0) x D positional embedding -> (1 + gh gw) x D: the patch part resized
    bicubically over the patch grid (align_corners=False), the class token's row kept."""
    if tuple(native) == tuple(grid):
        return pos
    cls, patches = pos[:1], pos[1:]
    d = pos.shape[-1]
    img = patches.reshape(1, native[0], native[1], d).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(-1, d).to(pos.dtype)])
