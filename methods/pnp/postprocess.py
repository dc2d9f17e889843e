"""PnP-OVSS step 5: thresholded per-class maps -> one label map (the reference code's
post-processing, ``blur+crf``).

1. bilinear upsampling of the thresholded maps to the working size (``align_corners=True``);
2. background channel ``1[max_k B_k == 0]`` (class sets with a background only);
3. Gaussian blur of every channel with ``sigma_px = sigma · max(h, w)`` (scipy, mode reflect),
   then a per-channel min-max to [0, 1] (a constant channel becomes 0);
4. optional dense CRF (pydensecrf2, Krähenbühl and Koltun's mean-field inference): unary
   ``-log softmax(channels)``, a Gaussian kernel (sxy 3, compat 7) and a bilateral kernel
   (sxy 50, srgb 5, compat 10) on the RGB image, 10 iterations (the reference's values);
5. argmax over channels.

Arrays: maps ``[C, h, w]`` float32; rgb ``[h, w, 3]`` uint8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import OvssError

CRF_DEFAULTS: dict[str, float] = {"crf_iters": 10, "crf_gauss_sxy": 3, "crf_gauss_compat": 7,
                                  "crf_bilateral_sxy": 50, "crf_bilateral_srgb": 5,
                                  "crf_bilateral_compat": 10}


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[K, P, P]`` -> ``[K, h, w]``, bilinear with ``align_corners=True`` (the reference)."""
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=True)[0]


def background_channel(maps: torch.Tensor) -> torch.Tensor:
    """Background where no class passed the threshold: ``1[max_k B_k == 0]``, ``[1, h, w]``."""
    if maps.shape[0] == 0:
        return torch.ones((1, *maps.shape[1:]))
    return (maps.amax(0, keepdim=True) <= 0).float()


def gaussian_blur(maps: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of each channel (scipy.ndimage, mode reflect), then per-channel min-max.

    maps: ``[C, h, w]`` float; sigma_px: the standard deviation in pixels (0: no blur).
    Returns ``[C, h, w]`` float32 in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    out = np.empty(maps.shape, np.float32)
    for c in range(maps.shape[0]):
        x = maps[c].astype(np.float64)
        if sigma_px > 0:
            x = gaussian_filter(x, sigma=float(sigma_px), mode="reflect")
        lo, hi = x.min(), x.max()
        out[c] = (x - lo) / (hi - lo) if hi > lo else 0.0
    return out


def dense_crf(probs: np.ndarray, rgb: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """Mean-field dense CRF over ``probs`` ``[C, h, w]`` (rows sum to 1) on ``rgb``
    ``[h, w, 3]`` uint8; returns the refined marginals ``[C, h, w]`` float32."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise OvssError("pnp: the dense CRF needs pydensecrf2 (pip install pydensecrf2), "
                        "or set crf=false") from None
    c, h, w = probs.shape
    s = {**CRF_DEFAULTS, **settings}
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=s["crf_gauss_sxy"], compat=s["crf_gauss_compat"])
    crf.addPairwiseBilateral(sxy=s["crf_bilateral_sxy"], srgb=s["crf_bilateral_srgb"],
                             rgbim=np.ascontiguousarray(rgb, dtype=np.uint8),
                             compat=s["crf_bilateral_compat"])
    q = crf.inference(int(s["crf_iters"]))
    return np.asarray(q, np.float32).reshape(c, h, w)


def channels_to_labels(thresholded: torch.Tensor, size: tuple[int, int], background: bool,
                       sigma: float, crf: bool, rgb: np.ndarray | None,
                       crf_settings: Mapping[str, Any]) -> np.ndarray:
    """Steps 1-5 at the working size: ``[K, P, P]`` thresholded maps -> ``[h, w]`` int64
    channel indices (with a background: 0 = background, k + 1 = class k; else k = class k)."""
    up = upsample_maps(thresholded.float(), size)
    chans = torch.cat([background_channel(up), up]) if background else up
    if chans.shape[0] <= 1:                  # one channel (or none): nothing to choose
        return np.zeros(size, np.int64)
    blurred = gaussian_blur(chans.numpy(), sigma * max(size))
    if crf:
        probs = torch.softmax(torch.from_numpy(blurred), 0).numpy()
        blurred = dense_crf(probs, rgb, crf_settings)
    return np.argmax(blurred, 0).astype(np.int64)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``[h, w]`` label map to ``size`` (pixel centres)."""
    h, w = label.shape
    if (h, w) == tuple(size):
        return label
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]
