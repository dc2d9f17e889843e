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


def add_device_args(ap) -> None:
    """``--device`` (where the model runs: cpu, cuda, cuda:N) and ``--tiny`` (the method's tiny
    backbone from its YAML and a small image: the CPU dry run of bench/device_check.sh)."""
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny backbone of conf/methods/<method>.yaml, images 60x80: a "
                         "seconds-long dry run of the bench's code, not a measurement")


def start_device(device: str) -> str:
    """``device`` checked (methods.infer.check_device: one line when torch cannot use it), its
    peak memory counter reset."""
    from methods.infer import check_device

    device = check_device(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    return device


def device_line(device: str, images: int, t_extract: float, trials: int, t_decode: float) -> str:
    """The line bench/device_check.sh collects: extraction images/s, decode ms per trial (one
    trial decodes every image) and per image, and on CUDA the peak GPU memory (MiB) since
    :func:`start_device`."""
    peak = (f" peak_gpu_mib={torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
            if device.startswith("cuda") else "")
    return (f"device={device} extract_img_per_s={images / t_extract:.3f} "
            f"decode_ms_per_trial={1000 * t_decode / trials:.1f} "
            f"decode_ms_per_image={1000 * t_decode / (trials * images):.1f}{peak}")


def tiny_segmenter(method: str, device: str, settings: dict | None = None):
    """The method's ``tiny`` backbone (its smoke preset) with ``settings`` on top."""
    from methods import get_segmenter_class
    from methods.spec import load_method_spec
    from search.core.config import resolve

    spec = load_method_spec(method)
    smoke = spec.presets["smoke"]
    r = resolve(spec, backbone=smoke.backbone, dataset="voc21", preset=smoke)
    return get_segmenter_class(method).from_spec(r.backbone, {**r.settings, **(settings or {})},
                                                 device)


class ExtractOnce:
    """Our side of an extract-once bench: each image extracted once, then every trial decoded
    from its evidence, timed. ``tag(params)`` names a trial's variant for the per-variant line.
    Sums: ``t_extract``, ``t_decode`` (s); ``evidence_mb`` per image; ``per_variant`` tag -> s;
    ``last``: the last image's evidence."""

    def __init__(self, seg, classes, tag) -> None:
        self.seg, self.classes, self.tag = seg, classes, tag
        self.t_extract = self.t_decode = 0.0
        self.evidence_mb: list[float] = []
        self.per_variant: dict[str, list[float]] = {}
        self.last = None

    def run(self, image: np.ndarray, trials: list[dict]) -> list[np.ndarray]:
        """The label map of every trial on ``image``."""
        import time

        t0 = time.perf_counter()
        ev = self.seg.extract(image, self.classes)
        self.t_extract += time.perf_counter() - t0
        self.evidence_mb.append(ev.nbytes() / 1e6)
        self.last = ev
        labels = []
        for p in trials:
            t0 = time.perf_counter()
            labels.append(self.seg.decode(ev, p))
            dt = time.perf_counter() - t0
            self.t_decode += dt
            self.per_variant.setdefault(self.tag(p), []).append(dt)
        return labels

    def variant_line(self) -> str:
        """``decode ms per variant (mean over its trials): a 12 (n=3), ...``"""
        return "decode ms per variant (mean over its trials): " + ", ".join(
            f"{v} {1000 * np.mean(ts):.0f} (n={len(ts)})" for v, ts in
            sorted(self.per_variant.items()))
