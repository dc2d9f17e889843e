"""``python -m search.evaluate``: score a tuned config on a whole split with the standard protocol.

    python -m search.evaluate --config conf/tuned/clipseg-openai-vit-b16-voc21.yaml \\
        --dataset voc21 --data-root /data/VOC2012 --baseline paper

The config comes from a file (``search.export`` output or a search's ``best_config.yaml``), a
search run (``--run RUN_ID``) or a registered model (``--model models:/NAME/VERSION``). The
config carries its knobs, backbone and settings; the test data set brings its classes. Scoring is
the confusion-matrix mIoU of ``rewards.miou`` (mmsegmentation's protocol, 255 ignored) summed over
every image of the split. Extraction runs as Ray tasks through the search's evidence cache (a
config evaluated on the images it was tuned on extracts nothing); decoding runs as Ray tasks over
chunks of images whose confusion matrices are summed in the driver.

The same code (:mod:`search.engine.scoring`) scores the held-out images of a search
(:mod:`search.engine.holdout`); :mod:`search.engine.evaluation` does the work of this command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from methods.base import OvssError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.evaluate",
                                description="Score a tuned config on a whole split (mIoU, aAcc, "
                                            "per-class IoU), optionally beside the paper "
                                            "defaults, and log it to MLflow.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="tuned config YAML (search.export / best_config.yaml)")
    src.add_argument("--run", help="MLflow run id of a search (its best_config.yaml)")
    src.add_argument("--model", help="registered model: models:/NAME/VERSION")
    p.add_argument("--dataset", required=True, help="data set to score on (conf/datasets/)")
    p.add_argument("--data-root", required=True, help="its root directory")
    p.add_argument("--split", default="val", help="split (default: val)")
    p.add_argument("--max-images", type=int, help="score the first N images only")
    p.add_argument("--baseline", choices=["paper"], help="paper: also score the method's paper "
                   "defaults on the same images and show the difference")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per Ray task (default 0)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per Ray task (default 1)")
    p.add_argument("--address", help="Ray cluster address to join (default: start Ray locally)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                   "or sqlite:///./mlflow.db)")
    p.add_argument("--verbose", action="store_true", help="show the libraries' own output (Ray, "
                   "Tune, Optuna, MLflow banners and INFO lines), hidden by default")
    p.add_argument("--cache-dir", help="evidence cache directory (default ./.ovss/cache)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from search.core.console import quiet_libraries

        quiet_libraries(args.verbose)
        from search.engine.evaluation import evaluate

        out = evaluate(args)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
