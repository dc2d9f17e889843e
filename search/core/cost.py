"""Seconds per image of a config's full inference pipeline, what ``methods.infer`` spends on one
image (``Segmenter.segment``: ``extract``, then ``extend`` for the extraction knobs, then
``decode``), measured part by part (docs/cost.md):

- ``extract``: once per distinct extraction setting (backbone, settings, classes, weights: the
  evidence cache's settings key) and device kind, on the first few tuning images, after an
  untimed warm-up call; the median of the timed calls;
- ``extend`` (methods with ``extraction_knobs``): the same, once per distinct value of those knobs;
- ``decode``: the median of the trial's own decode calls (every tuning image it scored).

A measurement is kept in a small JSON file beside the evidence cache,
``<cache>/cost/<k[:2]>/<k>.json``, keyed like evidence (method, settings key, knobs, code
version) plus the device kind and the timed images; the file carries ``ovss_sha256`` over its
canonical JSON and is written with :func:`methods.io.atomic_write`, so a damaged or half-written
file reads as missing and is measured again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

CHECKSUM = "ovss_sha256"


@lru_cache(maxsize=1)
def cost_conf() -> dict[str, Any]:
    """``conf/cost.yaml``: probe sizes and the defaults of the cost-aware flags."""
    import yaml

    from methods.base import CONF_DIR

    return yaml.safe_load((CONF_DIR / "cost.yaml").read_text())


def device_kind(device: str) -> str:
    """What a timing depends on besides the config: ``cuda:<GPU name>``, or
    ``cpu:<CPU model> x<torch threads>`` (the CPU's model name from /proc/cpuinfo, else the
    platform's)."""
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    base = device.split(":")[0]
    base = "cpu" if base == "cuda" else base     # CUDA asked for, none usable: the CPU runs it
    return f"{base}:{model or platform.processor() or platform.machine()} " \
           f"x{torch.get_num_threads()}"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after a
    call counts the call's work."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def time_calls(calls: Sequence[Callable[[], Any]], device: str, warmup: int = 1
               ) -> list[float]:
    """Seconds of each call, after ``warmup`` untimed calls of the first one (lazy model
    builds, allocator and kernel warm-up are not a per-image cost)."""
    for _ in range(warmup if calls else 0):
        calls[0]()
        synchronize(device)
    out = []
    for call in calls:
        synchronize(device)
        t0 = time.perf_counter()
        call()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def cost_key(stage: str, method: str, settings_key: Mapping[str, Any],
             knobs: Mapping[str, Any], kind: str, images: Sequence[str]) -> str:
    """Key of one measurement: the evidence key's parts, the stage, the device kind and the
    timed images' hashes."""
    from search.core.cache import code_version

    payload = {"stage": stage, "method": method, "settings": settings_key,
               "knobs": dict(sorted(knobs.items())), "code": code_version(method),
               "device": kind, "images": list(images)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _digest(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


class CostCache:
    """Measurements as checksummed JSON files under ``<root>/cost/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "cost"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The verified entry, or None when missing, damaged or not ours."""
        try:
            doc = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("entry"), dict):
            return None
        if doc.get(CHECKSUM) != _digest(doc["entry"]):
            return None
        return doc["entry"]

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        """Publish ``entry`` (JSON-able); a valid entry already there is kept (first wins), a
        damaged one replaced. A cache that cannot be written only loses the memo."""
        from methods.io import atomic_write

        text = json.dumps({"entry": dict(entry), CHECKSUM: _digest(entry)}, sort_keys=True,
                          default=str)
        try:
            if not atomic_write(self.path(key), text, overwrite=False) \
                    and self.get(key) is None:
                atomic_write(self.path(key), text, overwrite=True)
        except OSError:
            pass


def measured(cache_dir: str | Path, key: str, measure: Callable[[], list[float]],
             kind: str) -> dict[str, Any]:
    """The cached measurement under ``key``, or ``measure()`` (seconds per timed image) run now
    and cached: ``{"seconds": median, "samples": [...], "device_kind": kind, "cached": bool}``."""
    cache = CostCache(cache_dir)
    hit = cache.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    samples = [float(s) for s in measure()]
    entry = {"seconds": median(samples), "samples": samples, "device_kind": kind,
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    cache.put(key, entry)
    # Two workers that time the same setting at once: both use the first one's published
    # entry, so every trial of one setting carries the same extract / extend seconds.
    return {**(cache.get(key) or entry), "cached": False}
