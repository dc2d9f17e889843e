"""``python -m search.transfer``: does a config tuned on one data set hold on another?

    python -m search.transfer --config conf/tuned/clipseg-openai-vit-b16-voc21.yaml \\
        --config conf/tuned/clipseg-openai-vit-b16-ade20k.yaml \\
        --dataset voc21=/data/VOC2012 --dataset ade20k=/data/ADEChallengeData2016

Rows: where each config was tuned (its ``dataset`` field), plus one paper-defaults row per
(method, backbone) among the configs; columns: the data sets it is tested on; cells: mIoU (%) with
the protocol of :mod:`search.evaluate`. A config carries its knobs, backbone and settings; the
test data set brings its classes (and the method YAML's ``datasets.<name>.settings``). Logged on
one MLflow run (``ovss_role=transfer``) as ``transfer_table.csv`` / ``.md`` and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from methods.base import OvssError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.transfer",
                                description="Score tuned configs on several data sets: rows = "
                                            "where each was tuned (+ paper defaults), columns = "
                                            "where it is tested.")
    p.add_argument("--config", action="append", required=True,
                   help="tuned config YAML (repeat for each)")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT",
                   help="a test data set and its root (repeat for each)")
    p.add_argument("--split", default="val", help="split of every test data set (default val)")
    p.add_argument("--max-images", type=int, help="the first N images of each data set")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper-defaults row")
    p.add_argument("--experiment", default="transfer", help="MLflow experiment (default "
                   "'transfer')")
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
        from search.engine.transfer import transfer

        out = transfer(args)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
