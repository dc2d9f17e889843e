"""What a search pays to start and stop its local Ray, with and without the two changes of
``search.engine.session``: ``LOCAL_RAY_ENV`` (the raylet's retry interval for its first connection
to its object store; no idle workers started ahead) and ``shutdown_ray`` (the autoscaler
monitor killed first).

    python bench/ray_start.py            # 8 starts and stops of each kind, interleaved

Prints the start and stop times of each kind (median, max, and how many starts took a second
more than the fastest), and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _one(fast: bool) -> tuple[float, float]:
    import ray

    from search.engine.session import init_ray, shutdown_ray

    t0 = time.perf_counter()
    if fast:
        init_ray(None)
    else:     # init_ray's arguments, without LOCAL_RAY_ENV
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    start = time.perf_counter() - t0
    ray.get(ray.remote(lambda: 1).remote())     # a worker ran, as in a search
    t0 = time.perf_counter()
    shutdown_ray() if fast else ray.shutdown()
    return start, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from search.engine.session import LOCAL_RAY_ENV

    if any(k in os.environ for k in LOCAL_RAY_ENV):
        raise SystemExit(f"unset {', '.join(LOCAL_RAY_ENV)} first: they are what is measured")
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.runs):
        for fast in (False, True):
            rows[fast].append(_one(fast))
    low = min(s for r in rows.values() for s, _ in r)
    med = {}
    for fast, name in ((False, "Ray's defaults"), (True, "search.engine.session")):
        starts = [s for s, _ in rows[fast]]
        stops = [s for _, s in rows[fast]]
        med[fast] = (statistics.median(starts), statistics.median(stops))
        slow = sum(s > low + 0.8 for s in starts)
        print(f"{name}: start median {med[fast][0]:.2f} s (max {max(starts):.2f} s, "
              f"{slow} of {len(starts)} a second slower than the fastest), stop median "
              f"{med[fast][1]:.2f} s (max {max(stops):.2f} s)")
    print(f"start_ratio={med[False][0] / med[True][0]:.2f}")
    print(f"stop_ratio={med[False][1] / med[True][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
