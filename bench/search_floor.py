"""What a small search costs in a Ray the process already holds (as the tests' in-process
searches run: tests/conftest.py), by the CPUs that Ray has and whether its MLflow store exists:

    python bench/search_floor.py            # 3 rounds, each kind once per round, interleaved

Kinds: ``2 CPUs, new store`` (two trials at once: two Tune actors; MLflow creates the sqlite store
and runs its schema migrations), ``1 CPU, new store`` (one actor), ``1 CPU, ready store`` (a
migrated empty store copied in first, as for the tests marked ``ready_store``). Each search: the
toy method of tests/toy_method.py on 8 generated VOC scenes, 6 trials, one rung. Two Rays (one
per CPU count) are started in child processes; each search's CPU is the whole machine's
(/proc/stat: run it on an otherwise idle machine), its wall time the search's. The first search
of each Ray is a warm-up and not counted. Prints the medians and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine_cpu() -> float:
    """CPU seconds the whole machine spent (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")


def child(cpus: int, data: str, store: str, work: str) -> None:
    """In a child process: a Ray with ``cpus`` CPUs, then one search per line read from stdin
    (``fresh`` or ``ready``); prints ``seconds cpu_seconds`` per search."""
    import ray

    from search.run import main

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    for i, line in enumerate(sys.stdin):
        d = Path(work) / f"s{i}"
        d.mkdir()
        os.chdir(d)
        if line.strip() == "ready":
            shutil.copyfile(store, d / "mlflow.db")
        c, t = machine_cpu(), time.perf_counter()
        argv = ["--method", "toy", "--dataset", "voc21", "--data-root", data,
                "--num-samples", "6", "--rungs", "1"]
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            rc = main(argv)
        print(f"{time.perf_counter() - t:.3f} {machine_cpu() - c:.3f} {rc}", flush=True)
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    env = {**os.environ, "OVSS_CONF_PATH": str(REPO / "tests" / "conf"),
           "OVSS_METHOD_MODULES": "toy=tests.toy_method",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")}
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    from mlflow.tracking import MlflowClient

    from search.data.synthetic import make_dataset

    with tempfile.TemporaryDirectory(prefix="ovss-floor-") as tmp:
        data = str(make_dataset("voc", Path(tmp) / "voc", n=8, seed=0))
        store = Path(tmp) / "empty.db"
        MlflowClient(f"sqlite:///{store}").search_experiments()
        procs = {}
        for cpus in (2, 1):
            work = Path(tmp) / f"cpus{cpus}"
            work.mkdir()
            procs[cpus] = subprocess.Popen(
                [sys.executable, __file__, "--child", str(cpus), data, str(store), str(work)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, env=env, cwd=REPO)
        kinds = [("2 CPUs, new store", 2, "fresh"), ("1 CPU, new store", 1, "fresh"),
                 ("1 CPU, ready store", 1, "ready")]
        rows: dict[str, list[tuple[float, float]]] = {k: [] for k, _, _ in kinds}

        def one(cpus: int, what: str) -> tuple[float, float]:
            p = procs[cpus]
            p.stdin.write(what + "\n")
            p.stdin.flush()
            secs, cpu, rc = p.stdout.readline().split()
            if rc != "0":
                raise SystemExit(f"a search with {cpus} CPU(s) failed (exit {rc})")
            return float(secs), float(cpu)

        for cpus in (2, 1):
            one(cpus, "fresh")                                  # warm-up, not counted
        for _ in range(args.rounds):
            for name, cpus, what in kinds:
                rows[name].append(one(cpus, what))
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=120)
    med = {k: (statistics.median(s for s, _ in v), statistics.median(c for _, c in v))
           for k, v in rows.items()}
    for name, (secs, cpu) in med.items():
        print(f"{name:20s} {secs:5.1f} s  {cpu:5.1f} CPU-s  (median of {args.rounds})")
    a, b, c = (med[k] for k, _, _ in kinds)
    print(f"CPU-s, 2 CPUs / 1 CPU (new stores): {a[1] / b[1]:.2f}x; "
          f"1 CPU, new / ready store: {b[1] / c[1]:.2f}x ({b[1] - c[1]:.1f} CPU-s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        child(int(sys.argv[2]), *sys.argv[3:6])
        sys.exit(0)
    sys.exit(main())
