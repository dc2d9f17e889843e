"""Shared by the benches: synthetic images with some structure."""

from __future__ import annotations

import numpy as np
import torch


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random image with some structure (blurred blobs plus noise), HxWx3 uint8."""
    small = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(2, 0, 1)[None]
    big = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    noise = torch.from_numpy(rng.normal(0, 12, (3, h, w)).astype(np.float32))[None]
    return (big + noise).clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
