"""What tuning buys on the toy CLIP: real searches, scored on scenes no search saw.

    python -m bench.toy_clip_family                      # every part (~10 min on 2 cores)
    python -m bench.toy_clip_family --part regret --seeds 3 --trials 24

Each search is ``python -m search.run --method clipseg --preset smoke`` (the toy CLIP, local Ray,
Optuna, MLflow sqlite in a temp dir) on a generated tuning set (``--tune-images`` scenes of
generator seed 0, ``--holdout 0``); every score below is then computed the same way for the
default and the tuned knobs, on ``--held-images`` scenes of the held-out generator seed
(bench/toy_clip.py: ``HELD_OUT_SEED``), with ``bench.toy_clip.heldout_scores``. Parts:

- ``family``: per variant (``--set attention=V``, the rest of the space searched; SC-CLIP with
  its preset's space), default vs tuned held-out mIoU on the VOC-like and the Context-like set;
  PAMR (``pamr_steps`` / ``pamr_dilations``) is in every variant's space;
- ``transfer``: the full-space search tuned on one set, tested on both (rows: tuned on; the
  paper defaults as a row);
- ``fidelity``: ``--reward clip --fidelity`` with the toy CLIP as the reward's backbone: the
  Spearman / Kendall correlation of the label-free reward with mIoU over the trials, and the
  mIoU regret of picking by the reward;
- ``regret``: TPE against random search at equal trials (``--rungs 1``: every trial scores every
  tuning image): best-so-far mIoU per trial, mean over ``--seeds`` seeds, as regret against the
  best mIoU any of these searches found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.toy_clip import LAYOUTS, heldout_scores
from search.data.synthetic import make_dataset

VARIANTS = ("maskclip", "sclip", "clearclip", "naclip", "cra", "scclip")
OTHER = {"voc21": "context60", "context60": "voc21"}


class Searches:
    """Searches in one temp dir (cache, Tune storage, MLflow sqlite), by name."""

    def __init__(self, root: Path, tune_images: int, verbose: bool = False):
        self.root, self.n, self.verbose = root, tune_images, verbose
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    def tune_root(self, dataset: str) -> Path:
        return make_dataset(LAYOUTS[dataset], self.root / f"tune-{dataset}", n=self.n, seed=0)

    def run(self, name: str, dataset: str, *extra: str, trials: int = 24, seed: int = 0,
            sampler: str = "tpe") -> dict[str, Any]:
        """Run one search; returns its best config (best_config.yaml) with ``seconds``."""
        from search.run import main as run_main

        argv = ["--method", "clipseg", "--preset", "smoke", "--dataset", dataset,
                "--data-root", str(self.tune_root(dataset)), "--holdout", "0",
                "--num-samples", str(trials), "--seed", str(seed), "--sampler", sampler,
                "--name", name, "--cache-dir", str(self.root / "cache"),
                "--storage", str(self.root / "ray"), "--tracking-uri", self.uri, *extra]
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = run_main(argv)
        if rc != 0 or self.verbose:
            sys.stderr.write(out.getvalue()[-4000:])
        if rc != 0:
            raise SystemExit(f"search {name} failed (exit {rc}): {' '.join(argv)}")
        seconds = time.perf_counter() - t0
        client, parent = self.parent(name, dataset)
        local = client.download_artifacts(parent.info.run_id, "best_config.yaml",
                                          str(self.root))
        cfg = yaml.safe_load(Path(local).read_text())
        cfg["seconds"] = seconds
        return cfg

    def parent(self, name: str, dataset: str):
        """(MLflow client, the parent run of search ``name``)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(f"clipseg/toy-clip/{dataset}")
        return client, client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}' "
                                          "and tags.ovss_role = 'search'")[0]

    def trials(self, name: str, dataset: str) -> tuple[list[dict[str, float]], dict]:
        """The search's trials' metrics in trial order, and the parent run's metrics."""
        client, parent = self.parent(name, dataset)
        kids = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
        kids.sort(key=lambda r: int(r.data.tags.get("ovss_trial_number", 0)))
        return [dict(r.data.metrics) for r in kids], dict(parent.data.metrics)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def family(s: Searches, args) -> None:
    print(f"\n## Default vs tuned per variant ({args.trials} trials on {args.tune_images} "
          f"scenes, seed 0; held-out mIoU % on {args.held_images} scenes; in brackets: the "
          f"tuned config with PAMR off)\n")
    print("| variant | VOC-like default | tuned | Context-like default | tuned "
          "| tuned knobs (VOC) |")
    print("|---|---|---|---|---|---|")
    for v in args.variants.split(","):
        cells, knobs = [], ""
        for ds in ("voc21", "context60"):
            extra = variant_flags(v)
            cfg = s.run(f"family-{v}-{ds}", ds, *extra, trials=args.trials)
            default, tuned, no_pamr = heldout_scores(
                ds, [{"attention": v}, cfg["params"], {**cfg["params"], "pamr_steps": 0}],
                n=args.held_images)
            cells += [pct(default["miou"]), f"{pct(tuned['miou'])} ({pct(no_pamr['miou'])})"]
            if ds == "voc21":
                p = cfg["params"]
                knobs = ", ".join(f"{k}={round(p[k], 3) if isinstance(p[k], float) else p[k]}"
                                  for k in KNOBS[v] if k in p)
        print(f"| {v} | " + " | ".join(cells) + f" | {knobs} |", flush=True)


#: The knobs each variant reads (printed for its tuned config).
COMMON = ("bg_threshold", "pamr_steps", "pamr_dilations")
KNOBS = {"maskclip": COMMON, "sclip": COMMON, "clearclip": COMMON,
         "naclip": (*COMMON, "gaussian_std"),
         "cra": (*COMMON, "layer", "tau", "epsilon", "dsi_start", "min_pts"),
         "scclip": (*COMMON, "pre_adjust_idx", "post_adjust_idx", "multi_start_idx",
                    "multi_end_idx", "res_cls", "adjust_beta")}


def variant_flags(v: str) -> list[str]:
    """``--set`` flags that fix attention to ``v`` and every knob ``v`` does not read at its
    default: the search spends its trials on the variant's own knobs (:data:`KNOBS`)."""
    from methods.spec import load_method_spec
    from search.core.config import resolve

    spec = load_method_spec("clipseg")
    r = resolve(spec, "toy-clip", "voc21", None, spec.presets["smoke"])
    flags = ["--set", f"space.attention.choices=[{v}]", "--set", f"attention={v}"]
    for k in sorted(r.space):
        if k != "attention" and k not in KNOBS[v]:
            flags += ["--set", f"{k}={r.defaults[k]}"]
    return flags


def transfer(s: Searches, args) -> None:
    print(f"\n## Transfer (full space, {args.trials} trials; held-out mIoU %)\n")
    print("| tuned on \\ tested on | VOC-like | Context-like |")
    print("|---|---|---|")
    tuned = {ds: s.run(f"transfer-{ds}", ds, trials=args.trials)["params"]
             for ds in ("voc21", "context60")}
    rows: dict[str, list[str]] = {"paper defaults": [], "VOC-like": [], "Context-like": []}
    for test in ("voc21", "context60"):
        d, tv, tc = heldout_scores(test, [{}, tuned["voc21"], tuned["context60"]],
                                   n=args.held_images)
        rows["paper defaults"].append(pct(d["miou"]))
        rows["VOC-like"].append(pct(tv["miou"]))
        rows["Context-like"].append(pct(tc["miou"]))
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(v) + " |")


def fidelity(s: Searches, args) -> None:
    print(f"\n## The CLIP reward's fidelity (toy CLIP as the reward; {args.trials} trials)\n")
    print("| data set | Spearman | Kendall | mIoU regret of the reward's pick (points) |")
    print("|---|---|---|---|")
    for ds in ("voc21", "context60"):
        name = f"fidelity-{ds}"
        s.run(name, ds, "--reward", "clip", "--reward-backbone", "toy-clip", "--fidelity",
              "--rungs", "1", trials=args.trials)
        _, m = s.trials(name, ds)
        print(f"| {ds} | {m.get('fidelity_spearman', float('nan')):.2f} | "
              f"{m.get('fidelity_kendall', float('nan')):.2f} | "
              f"{100 * m.get('fidelity_regret_miou', float('nan')):.1f} |", flush=True)


def regret(s: Searches, args) -> None:
    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    for sampler in curves:
        for seed in range(args.seeds):
            name = f"regret-{sampler}-{seed}"
            s.run(name, "voc21", "--rungs", "1", trials=args.trials, seed=seed, sampler=sampler)
            scores = [t.get("miou", 0.0) for t in s.trials(name, "voc21")[0]]
            best, curve = 0.0, []
            for x in scores:
                best = max(best, x)
                curve.append(best)
            curves[sampler].append(curve)
    top = max(c[-1] for cs in curves.values() for c in cs)
    print(f"\n## TPE vs random search (VOC-like tuning set, {args.seeds} seeds, full space): "
          f"regret = {pct(top)} - best-so-far mIoU (points), mean over seeds\n")
    marks = [t for t in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) if t <= args.trials]
    print("| trials | " + " | ".join(str(t) for t in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for sampler, cs in curves.items():
        mean = [sum(c[t - 1] for c in cs) / len(cs) for t in marks]
        print(f"| {sampler} | " + " | ".join(f"{100 * (top - m):.1f}" for m in mean) + " |")


PARTS = {"family": family, "transfer": transfer, "fidelity": fidelity, "regret": regret}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_clip_family",
                                description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seeds", type=int, default=3, help="regret: searches per sampler")
    p.add_argument("--tune-images", type=int, default=24)
    p.add_argument("--held-images", type=int, default=40)
    p.add_argument("--variants", default=",".join(VARIANTS), help="family: these variants")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ovss-toy-family-") as tmp:
        s = Searches(Path(tmp), args.tune_images, args.verbose)
        for name, part in PARTS.items():
            if args.part in (name, "all"):
                part(s, args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
