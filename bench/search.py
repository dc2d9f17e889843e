"""The search's own cost: framework overhead and 2-worker scaling of a decode-bound search.

    python bench/search.py                          # 64 trials, 16 images, ViT-B/16 (~6-9 min)
    python bench/search.py --trials 8 --images 4    # quick look

A real ``python -m search.run --method clipseg`` (local Ray, Optuna TPE, MLflow sqlite in a temp
dir) on the real-size open_clip ViT-B/16 with random weights (saved once as a local checkpoint and
loaded with ``--set backbone.path=``), on a generated VOC-layout data set of ``--images`` images
(375 x 500). First one search fills the evidence cache (its time is not counted); then the
measured searches run on cached evidence, with ``--rungs 1`` so every trial decodes every image:

- ``overhead``: for the 1-at-a-time search, (search wall - sum of decode - sum of scoring) /
  search wall, where the sums are what the trials themselves measured (``time/decode_s``,
  ``time/score_s`` on each child run) and the wall is the whole ``search.run`` call (Ray start,
  MLflow, tuning, plots, overlays). Printed with the per-trial overhead in ms and where it goes
  (the parent run's ``time/<phase>_s``).
- ``scaling``: search wall with 1 trial at a time over the same search with 2 at a time
  (``--max-concurrent``; the machine has 2 cores, each trial 1 CPU and 1 torch thread), both
  with ``--sampler random``: its i-th trial is the same at any concurrency, so the two searches
  run the same trials (checked and printed; TPE's suggestions depend on the order results come
  back, and clipseg's decode cost on the attention variant). The tuning phase's own ratio is
  printed beside it.
- the peak RSS of a trial worker (``worker/max_rss_mb``) against the evidence it reads.

The last two lines are ``overhead=<fraction>`` and ``scaling=<2 over 1>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _search(root: Path, data: Path, ckpt: Path, trials: int, concurrent: int, name: str,
            images: int, sampler: str = "tpe") -> tuple[float, str]:
    from search.run import main as run_main

    argv = ["--method", "clipseg", "--backbone", "openai-vit-b16", "--dataset", "voc21",
            "--data-root", str(data), "--num-samples", str(trials), "--rungs", "1",
            "--max-images", str(images), "--max-concurrent", str(concurrent), "--name", name,
            "--sampler", sampler,
            "--cache-dir", str(root / "cache"), "--storage", str(root / "ray_results"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--set", f"backbone.path={ckpt}", "--set", "settings.templates=simple"]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = run_main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.stderr.write(err.getvalue()[-3000:])
        raise SystemExit(f"search {name} failed with exit {rc}")
    return wall, name


def _record(root: Path, name: str) -> tuple[dict, list[dict], list[tuple]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(exps, f"tags.ovss_search_name = '{name}' and "
                                "tags.ovss_role = 'search'")[0]
    children = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=10000)
    configs = sorted(tuple(sorted(c.data.params.items())) for c in children)
    return parent.data.metrics, [c.data.metrics for c in children], configs


def _phases(parent: dict) -> tuple[dict[str, float], float]:
    """The parent run's ``time/<phase>_s`` metrics as ``{phase: s}`` (wall-clock phases only),
    and ``time/tune_driver_cpu_s`` (the driver's CPU while tuning) beside them."""
    phases = {k.removeprefix("time/").removesuffix("_s"): v for k, v in parent.items()
              if k.startswith("time/")}
    return phases, phases.pop("tune_driver_cpu", float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import open_clip
    import torch

    from search.data.synthetic import make_dataset

    with tempfile.TemporaryDirectory(prefix="ovss-bench-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = make_dataset("voc", root / "voc", n=args.images, size=(375, 500), seed=0)
        ckpt = root / "vit-b16-random.pt"
        if not ckpt.is_file():
            torch.manual_seed(0)
            model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
            torch.save(model.state_dict(), ckpt)
            del model
        t0 = time.perf_counter()
        _search(root, data, ckpt, 1, 2, "warm", args.images)
        warm = time.perf_counter() - t0
        print(f"search bench: clipseg ViT-B/16 (random weights) on {args.images} images 375x500 "
              f"-> 448, {args.trials} trials, --rungs 1, evidence cached first ({warm:.0f} s, "
              "not counted); local Ray, MLflow sqlite")
        walls, rows = {}, {}
        # TPE (the default) one at a time for the overhead; the random sampler for the scaling
        # pair, whose i-th trial is the same at any concurrency (TPE's depend on the order
        # results come back, and clipseg's decode cost on the attention variant).
        for key, sampler, conc in (("tpe1", "tpe", 1), ("rnd1", "random", 1),
                                   ("rnd2", "random", 2)):
            walls[key], name = _search(root, data, ckpt, args.trials, conc, key, args.images,
                                       sampler)
            rows[key] = _record(root, name)
        parent, children, _ = rows["tpe1"]
        dec = sum(c.get("time/decode_s", 0.0) for c in children)
        score = sum(c.get("time/score_s", 0.0) for c in children)
        ev = sum(c.get("time/evidence_s", 0.0) for c in children)
        wall = walls["tpe1"]
        over = (wall - dec - score) / wall
        n = len(children)
        per = 1000 * (wall - dec - score) / max(n, 1)
        phases, driver_cpu = _phases(parent)
        tuned = phases.get("tune", 0.0)
        inside = 1000 * (tuned - dec - score - ev) / max(n, 1)
        print(f"1 at a time: wall {wall:.1f} s, {n} trials: decode {dec:.1f} s "
              f"({1000 * dec / (n * args.images):.0f} ms per image), scoring {score:.1f} s, "
              f"evidence reads {ev:.1f} s")
        print("  where the rest goes: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + f"; inside tuning, per trial beyond decode/score/evidence: {inside:.0f} ms")
        print(f"  framework overhead {per:.0f} ms per trial; the driver's CPU while tuning "
              f"{driver_cpu:.1f} s ({1000 * driver_cpu / max(n, 1):.0f} ms per trial)")
        same = rows["rnd1"][2] == rows["rnd2"][2]
        tune1, tune2 = (rows[k][0].get("time/tune_s", float("nan")) for k in ("rnd1", "rnd2"))
        for key in ("rnd1", "rnd2"):
            kids = rows[key][1]
            d = sum(c.get("time/decode_s", 0.0) for c in kids)
            spent, cpu = _phases(rows[key][0])
            print(f"random sampler, {key[-1]} at a time: wall {walls[key]:.1f} s, tuning "
                  f"{spent.get('tune', float('nan')):.1f} s (driver CPU {cpu:.1f} s), "
                  f"{len(kids)} trials, decode {1000 * d / (len(kids) * args.images):.0f} ms "
                  "per image")
            print("  outside tuning: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()
                                                   if k != "tune")
                  + f"; the rest of the wall {walls[key] - sum(spent.values()):.1f} s")
        print(f"  the two ran the same {len(rows['rnd1'][2])} trial configs: {same}; tuning "
              f"phase alone {tune1 / tune2:.2f}x")
        rss = max(c.get("worker/max_rss_mb", 0.0) for key in rows for c in rows[key][1])
        ev_mb = sum(f.stat().st_size for f in (root / "cache").rglob("*.safetensors")) / 2**20
        print(f"trial worker peak RSS {rss:.0f} MiB; evidence on disk {ev_mb:.0f} MiB "
              f"(working set); excess {rss - ev_mb:.0f} MiB")
        print(f"overhead={over:.3f}")
        print(f"scaling={walls['rnd1'] / walls['rnd2']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
