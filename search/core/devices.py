"""Which torch device a Ray worker runs on, and the logical GPUs of a local Ray.

Ray's ``GPU`` is a scheduling count, not a device: a node may advertise GPUs that torch cannot
use (a local Ray started with ``OVSS_LOCAL_GPUS``, ``ray start --num-gpus`` on a CPU machine,
more logical GPUs than the machine has, a GPU node whose torch was built without CUDA). Ray then
sets ``CUDA_VISIBLE_DEVICES`` to an id that is no CUDA device, and ``torch.cuda.is_available()``
is False. A worker given such a GPU runs on the CPU instead (:func:`worker_device`) and says so
in one line (the driver prints it once per node, the trial runs are tagged ``ovss_device=cpu
(...)``), rather than dying in a CUDA traceback: CPU and CUDA give the same label maps (tests/
test_gpu.py measures how closely), so the fallback costs time, not results. ``methods.infer
--device cuda`` refuses instead: there the user named the device (docs/gpu.md).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from methods.base import OvssError

#: Logical GPUs of a local Ray that a search starts itself (``ray.init(num_gpus=N)``).
LOCAL_GPUS_ENV = "OVSS_LOCAL_GPUS"


@dataclass(frozen=True)
class WorkerDevice:
    """device: what torch uses here (``cpu``, ``cuda``, ...); label: the same for a run's
    ``ovss_device`` tag; note: one line when the device is not the one Ray assigned, else ''."""

    device: str
    label: str
    note: str = ""


def _ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to this worker ([] outside a Ray worker)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except Exception:  # noqa: BLE001 - no Ray, or a Ray without this API: nothing assigned
        return []


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
    except Exception:  # noqa: BLE001
        return "this machine"


def worker_device(requested: str) -> WorkerDevice:
    """The device to build a segmenter on when ``requested`` (``cpu`` or ``cuda``) was chosen
    from Ray resources: ``cuda`` when torch sees a CUDA device (Ray's ``CUDA_VISIBLE_DEVICES``
    makes the assigned GPU device 0), else ``cpu`` with a one-line note naming the node, the
    GPU ids Ray assigned and why torch cannot use them."""
    if not str(requested).startswith("cuda"):
        return WorkerDevice(requested, requested)
    import torch

    ids = _ray_gpu_ids()
    with warnings.catch_warnings():   # a broken driver warns here; the note says it instead
        warnings.simplefilter("ignore")
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if usable:
        return WorkerDevice(requested, f"cuda:{','.join(ids)}" if ids else requested)
    why = ("torch here is built without CUDA" if torch.version.cuda is None
           else "torch.cuda.is_available() is False")
    gpus = f"GPU {','.join(ids)}" if ids else "a GPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = (f"node {_node_ip()}: Ray assigned {gpus} (CUDA_VISIBLE_DEVICES={visible}) but it is "
            f"no CUDA device ({why}; logical GPUs?): running on CPU")
    return WorkerDevice("cpu", f"cpu (Ray {gpus} is no CUDA device)" if ids
                        else "cpu (no CUDA device)", note)


def local_gpus(address: str | None) -> int | None:
    """``OVSS_LOCAL_GPUS``: the number of GPUs a local Ray started by the search advertises
    (logical GPUs on a CPU machine, to pack tasks and trials by GPU count; beyond the machine's
    real GPUs they run on CPU). None when unset. OvssError when it is not a whole number >= 0,
    or is set together with ``--address`` (a cluster's nodes declare their own GPUs)."""
    raw = os.environ.get(LOCAL_GPUS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise OvssError(f"{LOCAL_GPUS_ENV}={raw!r}: expected a whole number of GPUs (0 or more)")
    if address:
        raise OvssError(f"{LOCAL_GPUS_ENV}={raw} applies to a Ray the search starts itself, not "
                        f"to --address {address} (there each node declares its GPUs: ray start "
                        "--num-gpus N); unset it")
    return int(raw)
