"""Shared by the benches: synthetic images with some structure; a steady allocator."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

#: glibc malloc settings for benches that allocate hundreds of MB per forward (SAM's global
#: attention, LLM activations): freed memory stays in the heap instead of going back to the
#: kernel, so the next forward does not page-fault it in again (on this 2-core VM the page
#: faults showed as tens of seconds of system time; compare a run with OVSS_BENCH_MALLOC=0).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                 "MALLOC_TOP_PAD_": str(1 << 30)}


def steady_malloc(argv: list[str] | None) -> str:
    """Re-run this script under ``STEADY_MALLOC`` (glibc reads it at start-up) unless it is set
    or ``OVSS_BENCH_MALLOC=0``; returns a note for the output. Both sides of a comparison run in
    the one process, so both get it."""
    if os.environ.get("OVSS_BENCH_MALLOC") == "0":
        return "allocator: default"
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        if argv is None:  # only when run as a script (argv from sys.argv)
            os.execve(sys.executable, [sys.executable, *sys.argv],
                      {**os.environ, **STEADY_MALLOC})
        return "allocator: default (called with argv)"
    return "allocator: glibc heap kept (MALLOC_MMAP/TRIM_THRESHOLD_, OVSS_BENCH_MALLOC=0 to skip)"


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random image with some structure (blurred blobs plus noise), HxWx3 uint8."""
    small = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(2, 0, 1)[None]
    big = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    noise = torch.from_numpy(rng.normal(0, 12, (3, h, w)).astype(np.float32))[None]
    return (big + noise).clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
