"""Phase 2 of a search (docs/architecture.md), and of an evaluation: the Ray session: start or join
Ray, stop it fast, the resources extraction and trials ask for.

Entry points and the engine start Ray through :func:`init_ray` and stop what they started with
:func:`shutdown_ray`; nothing else calls ``ray.init`` / ``ray.shutdown``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from methods.base import OvssError

# A local Ray starts faster with these (bench/ray_start.py measures them against Ray's defaults):
# - its raylet's first connection to its own object store fails (the store is not listening yet)
#   and Ray waits raylet_client_connect_timeout_milliseconds (1000) before the next try, which
#   often makes ray.init wait one more second for the node to register; same 10 s budget here
#   (100 x 100 ms instead of 10 x 1000 ms);
# - no idle workers are started ahead (Ray's default starts one per CPU when the first driver
#   registers): Tune runs every trial in an actor, a fresh worker process of its own, so the
#   workers started ahead serve at most the extraction tasks and otherwise only import Ray. A
#   2-trial toy search on 2 CPUs in a subprocess (three interleaved pairs, busy CPU-s from
#   /proc/stat): 39.4, 38.1, 38.4 CPU-s and 29.8, 29.2, 28.2 s with one idle worker per CPU
#   started with the raylet, 36.8, 35.9, 35.3 CPU-s and 27.2, 27.6, 27.0 s with none.
LOCAL_RAY_ENV = {"RAY_raylet_client_connect_timeout_milliseconds": "100",
                 "RAY_raylet_client_num_connect_attempts": "100",
                 "RAY_enable_worker_prestart": "0",
                 "RAY_prestart_worker_first_driver": "0"}


@contextlib.contextmanager
def scoped_env(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` inside the block, each unless the user set it already."""
    mine = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)


def init_ray(address: str | None) -> bool:
    """Start or join Ray. Returns True when this call started it (and so should stop it, with
    :func:`shutdown_ray`). A local Ray advertises ``OVSS_LOCAL_GPUS`` GPUs when it is set
    (search.core.devices.local_gpus), else what Ray detects."""
    import ray

    from search.core.devices import local_gpus

    if ray.is_initialized():
        return False
    gpus = local_gpus(address)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            if gpus is not None:
                kw["num_gpus"] = gpus
            with scoped_env(LOCAL_RAY_ENV):   # read by the processes ray.init starts
                ray.init(**kw)
    except Exception as e:  # ConnectionError, RuntimeError, ...
        where = f"at --address {address}" if address else "locally"
        hint = ""
        if address and not os.environ.get("RAY_AUTH_MODE"):
            # Ray 2.60 turns token authentication on by itself when ~/.ray/auth_token exists.
            hint = (" (if the cluster and this machine disagree on token authentication, set "
                    "RAY_AUTH_MODE=token with the cluster's RAY_AUTH_TOKEN, or "
                    "RAY_AUTH_MODE=disabled, on both)")
        raise OvssError(f"cannot start Ray {where}: {str(e).splitlines()[0]}{hint}") from None
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` of a Ray that :func:`init_ray` started, less the second it spends on
    the autoscaler monitor: that process does not exit on SIGTERM, and Ray waits 1 s before it
    SIGKILLs it. A local Ray's monitor keeps no state, so it is killed first. (Ray's private
    process table; when it is not there, the plain shutdown.)"""
    import ray

    try:
        node = ray._private.worker._global_node
        for info in list(getattr(node, "all_processes", {}).get("monitor", [])):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=2)
    except Exception:  # noqa: BLE001 - an internal layout this Ray does not have
        pass
    ray.shutdown()


def plan_resources(args) -> dict[str, float]:
    """Resource requests for extraction (the model) and for trials (decode only), checked
    against the cluster. A GPU cluster extracts on GPU by default and says so when trials ask
    for none; with ``--autoscale`` missing resources are requested from the autoscaler instead
    of refused (Tune and the extraction tasks then wait for the new nodes)."""
    import sys

    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    extract_gpus = (args.gpus_per_extract if args.gpus_per_extract is not None
                    else (1.0 if gpus >= 1 else 0.0))
    want = {"extract": {"GPU": extract_gpus, "CPU": args.cpus_per_extract},
            "trial": {"GPU": args.gpus_per_trial, "CPU": args.cpus_per_trial}}
    flags = {"extract": ("--gpus-per-extract", "--cpus-per-extract"),
             "trial": ("--gpus-per-trial", "--cpus-per-trial")}
    missing = []
    for role, need in want.items():
        for i, kind in enumerate(("GPU", "CPU")):
            if need[kind] > 0 and float(res.get(kind, 0)) < need[kind]:
                missing.append((role, kind, flags[role][i], need[kind]))
    if missing and getattr(args, "autoscale", False):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in need.items() if v > 0}
                                   for need in want.values()])
        print(f"asked the autoscaler for {', '.join(f'{n:g} {k}' for _, k, _, n in missing)}",
              file=sys.stderr)
    elif missing:
        role, kind, flag, n = missing[0]
        raise OvssError(f"{flag} {n:g} asked for, but the Ray cluster has "
                        f"{float(res.get(kind, 0)):g} {kind}(s) (on a cluster that scales up "
                        "on demand, add --autoscale)")
    if gpus > 0 and args.gpus_per_trial == 0:
        print(f"note: the Ray cluster has {gpus:g} GPU(s); trials decode on CPU "
              "(--gpus-per-trial 0), extraction uses "
              f"{extract_gpus:g} GPU per task (--gpus-per-extract)", file=sys.stderr)
    return {"extract_gpus": extract_gpus, "extract_cpus": args.cpus_per_extract,
            "trial_gpus": args.gpus_per_trial, "trial_cpus": args.cpus_per_trial}


def fault_point(name: str) -> None:
    """Fault-injection point for the crash tests: with ``OVSS_FAULT_PAUSE=<name>`` the driver
    says so on stderr and waits here to be killed. Does nothing otherwise."""
    if os.environ.get("OVSS_FAULT_PAUSE") == name:
        import sys
        import time

        print(f"ovss fault point: {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
