"""The toy method for the logical-GPU packing test (tests/test_gpu_packing.py).

Loaded in every Ray worker through ``OVSS_METHOD_MODULES=toy=tests.gpu_packing_method``.
``from_spec`` puts a tensor on the device it is given (on a machine without CUDA, ``cuda`` fails
there with torch's own error: the search must hand it a device torch can use). Every ``extract``
and ``decode`` appends one JSON line to ``$OVSS_TEST_PACKING_LOG``: the process, the call's start
and end, what Ray says it gave the worker (``get_assigned_resources``, ``get_accelerator_ids``,
node), the ``CUDA_VISIBLE_DEVICES`` Ray set, and the device the segmenter was built on.

With ``$OVSS_TEST_PACKING_BARRIER`` (a directory), a call waits until
``$OVSS_TEST_PACKING_<ROLE>_TARGET`` calls of its role are inside at once (or ``HOLD_S`` have
passed); the calls inside then stay until ``GRACE_S`` after that moment, so the calls that Ray
lets run together are all seen together (and one more than allowed would be seen too). Later
calls do not wait.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tests.toy_method import ToySegmenter

HOLD_S = 25.0     # the most a call waits for the others (worker start-up on a loaded machine)
GRACE_S = 1.5     # after the target is reached: the time an extra call would have to show up


def _ray_view() -> dict:
    import ray

    rc = ray.get_runtime_context()
    return {"assigned": rc.get_assigned_resources(),
            "gpu_ids": [str(i) for i in rc.get_accelerator_ids().get("GPU", [])],
            "node": rc.get_node_id()}


class _Inside:
    """Marks a call of ``role`` inside (a file in the barrier directory) and waits as above."""

    def __init__(self, role: str):
        self.role = role
        self.root = Path(os.environ["OVSS_TEST_PACKING_BARRIER"]) / role
        self.root.mkdir(parents=True, exist_ok=True)
        self.me = self.root / f"in-{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self):
        self.me.touch()
        target = int(os.environ.get(f"OVSS_TEST_PACKING_{self.role.upper()}_TARGET", "1"))
        released = self.root.parent / f"{self.role}.released"
        deadline = time.monotonic() + HOLD_S
        while not released.exists():
            if len(list(self.root.glob("in-*"))) >= target or time.monotonic() > deadline:
                released.touch()    # (on time-out too: the test then sees fewer at once)
                break
            time.sleep(0.05)
        # everyone inside at the release stays until GRACE_S after it
        time.sleep(max(0.0, released.stat().st_mtime + GRACE_S - time.time()))
        return self

    def __exit__(self, *exc):
        self.me.unlink(missing_ok=True)


class PackingToySegmenter(ToySegmenter):
    def __init__(self, settings, device: str = "cpu"):
        super().__init__(settings)
        self.device = device
        self.on_device = torch.zeros(1, device=device)   # a real use of the device

    @classmethod
    def from_spec(cls, backbone, settings, device="cpu"):
        super().from_spec(backbone, settings, device)       # the toy's backbone check
        return cls(settings, device)

    def _record(self, role: str, call):
        t0 = time.time()
        with _Inside(role):
            out = call()
        row = {"role": role, "pid": os.getpid(), "t0": t0, "t1": time.time(),
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "cuda_available": torch.cuda.is_available(), "device": self.device,
               "tensor_device": str(self.on_device.device), **_ray_view()}
        with open(os.environ["OVSS_TEST_PACKING_LOG"], "a") as f:
            f.write(json.dumps(row) + "\n")
        return out

    def extract(self, image, classes, present=None):
        return self._record("extract", lambda: super(PackingToySegmenter, self).extract(
            image, classes, present))

    def decode(self, evidence, params):
        return self._record("decode", lambda: super(PackingToySegmenter, self).decode(
            evidence, params))


SEGMENTER = PackingToySegmenter
