"""``python -m search.run``: one hyperparameter search of one method on one data set.

Flow (docs/architecture.md): validate everything (:mod:`search.engine.plan`) -> start/join Ray ->
parent MLflow run -> fill the evidence cache with Ray tasks -> Ray Tune (Optuna TPE, paper defaults
as trial 0, ASHA over growing image subsets) -> best config, plots and overlays on the parent run
(:func:`search.engine.search.run_search`; several backbones: :mod:`search.engine.backbones`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from methods.base import OvssError

REWARDS = ("miou", "clip")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, exit 2) like every other."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from methods import known_methods

    p = OneLineParser(
        prog="python -m search.run",
        description="Search the knobs of a training-free OVSS method with Ray Tune + Optuna, "
                    "logging every trial to MLflow.")
    p.add_argument("--method", required=True, choices=known_methods(),
                   help="method family: pnp (PnP-OVSS), clipseg (CLIP CRA+DSI), fseg (FSeg-LLaVA)")
    p.add_argument("--backbone", help="backbone name from conf/methods/<method>.yaml "
                   "(default: the YAML's default_backbone, or the preset's); a,b,c or all: one "
                   "search per backbone, then a summary run comparing them")
    p.add_argument("--dataset", help="data set name from conf/datasets/ (voc21, voc20, "
                   "context59, context60, coco_object, coco_stuff164k, ade20k, cityscapes) or "
                   "'folder' for DIR/images, DIR/masks, DIR/classes.txt")
    p.add_argument("--data-root", help="root directory of the data set in its standard layout")
    p.add_argument("--split", default="val", help="data set split to tune on (default: val)")
    p.add_argument("--max-images", type=int, help="tune on the first N images of the split")
    p.add_argument("--holdout", type=int, help="keep N images out of tuning and score the best "
                   "config and the paper defaults on them after the search (default: a fifth of "
                   "the images from 20 on, none below)")
    p.add_argument("--eval-split", help="score the best config and the paper defaults on this "
                   "split after the search instead (all of it, or --holdout N images)")
    p.add_argument("--image-labels", help="JSON {image_id: [class names]} of image-level labels "
                   "(default for --reward clip: DATA_ROOT/image_labels.json)")
    p.add_argument("--reward", choices=REWARDS,
                   help="objective: miou (dense labels, the default) or clip (label-free CLIP "
                        "contrastive reward; needs only image-level labels)")
    p.add_argument("--objectives", metavar="LIST", help="miou,seconds or clip,seconds: also "
                   "minimise the seconds per image of the config's full inference pipeline "
                   "(a Pareto front; docs/cost.md)")
    p.add_argument("--max-seconds-per-image", metavar="B", help="deploy budget: configs slower "
                   "than B seconds per image are infeasible; the best config is the best "
                   "within it")
    p.add_argument("--fastest-within", type=float, metavar="D", help="the summary names the "
                   "fastest config within D of the best score (default 0.01)")
    p.add_argument("--warm-start", metavar="RUN", help="enqueue the best configs of an earlier "
                   "search (its parent run id, or models:/NAME/VERSION) after the paper defaults")
    p.add_argument("--warm-start-top", type=int, metavar="K",
                   help="how many configs --warm-start enqueues (default 3)")
    p.add_argument("--patience", type=int, metavar="N", help="stop when N trials in a row "
                   "bring no improvement beyond --patience-margin")
    p.add_argument("--patience-margin", type=float, metavar="M", help="the improvement "
                   "--patience asks for, in score units (default 0.001)")
    p.add_argument("--reward-backbone", help="CLIP backbone of the clip reward "
                   "(conf/rewards/clip.yaml; default: its default_backbone)")
    p.add_argument("--fidelity", action="store_true",
                   help="with --reward clip on a labelled split: also score every trial with mIoU "
                        "(off the objective) and log rank correlations to the parent run")
    p.add_argument("--num-samples", type=int, help="number of trials (default 32; smoke: 8)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (default: "
                   "as many as the cluster's resources allow)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial (decode only), fractions allowed (default 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-extract", type=float, help="GPUs per extraction task (the model "
                   "forward; default: 1 when the cluster has GPUs, else 0). Trials only decode "
                   "cached evidence and ask for --gpus-per-trial")
    p.add_argument("--cpus-per-extract", type=float, default=1.0,
                   help="CPUs per extraction task (default 1)")
    p.add_argument("--autoscale", action="store_true", help="the cluster scales up on demand: "
                   "ask Ray's autoscaler for missing GPUs/CPUs instead of refusing")
    p.add_argument("--rungs", type=int, default=3,
                   help="ASHA rungs: trials are scored on growing image subsets (default 3)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own output (Ray, "
                   "Tune, Optuna, MLflow banners and INFO lines), hidden by default")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler (default 0)")
    p.add_argument("--sampler", choices=["tpe", "random", "nsga2"], default="tpe",
                   help="Optuna sampler: tpe (default; TPE with constant liar, multi-objective "
                   "with --objectives), random (a baseline; the same seed gives the same trials "
                   "whatever the concurrency) or nsga2 (NSGA-II, for long multi-objective "
                   "searches)")
    p.add_argument("--address", help="Ray cluster address to join (default: start Ray locally)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///./mlflow.db)")
    p.add_argument("--cache-dir", help="evidence cache directory (default ./.ovss/cache; on a "
                   "cluster, a directory every node mounts)")
    p.add_argument("--storage", help="Ray Tune results directory (default ./.ovss/ray_results)")
    p.add_argument("--name", help="search name, used by --resume (default: method-backbone-"
                   "dataset-reward)")
    p.add_argument("--preset", help="a preset of conf/methods/<method>.yaml: smoke (tiny "
                   "random-weight backbone of the real model class on a generated data set, "
                   "fully offline, 8 trials), or the method's own (clipseg: cra, sclip, naclip, "
                   "clearclip protocols; pnp: reference)")
    p.add_argument("--rerank-top", type=int, metavar="K", help="two-stage search: tune with the "
                   "method's cheaper `proxy` pipeline, then re-score the K best trials with the "
                   "full pipeline on all tuning images and pick the winner among them")
    p.add_argument("--register", metavar="NAME", help="register the tuned config's MLflow model "
                   "(logged on every search) in the Model Registry as NAME")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of the same --name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override: a knob (fixes it, e.g. tau=6), space.<knob>.<low|high|step|"
                        "log|choices>, settings.<name>, or backbone.<field> (e.g. "
                        "backbone.path=/ckpt)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from search.core.console import quiet_libraries

        quiet_libraries(args.verbose)
        from search.engine.backbones import run_backbones, wants_many
        from search.engine.plan import plan_search
        from search.engine.search import run_search

        if wants_many(args.backbone):
            summary = run_backbones(args)  # one search per backbone + a summary run
        else:
            plan = plan_search(args)
            summary = run_search(plan)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: runs marked KILLED; continue with --resume", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
