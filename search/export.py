"""``python -m search.export``: the best config of the latest search -> conf/tuned/*.yaml.

The file carries its provenance and everything ``methods.infer`` needs to rebuild the segmenter;
it never overwrites an existing file without --force (:mod:`search.record.export`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from methods.base import OvssError


def main(argv: Sequence[str] | None = None) -> int:
    from methods import known_methods
    from search.record.export import export

    p = argparse.ArgumentParser(prog="python -m search.export",
                                description="Write the best config of the latest search of a "
                                            "method to conf/tuned/<method>-<backbone>-<dataset>"
                                            ".yaml")
    p.add_argument("--method", required=True, choices=known_methods())
    p.add_argument("--backbone", help="default: that of the most recent search of the method")
    p.add_argument("--dataset", help="default: that of the most recent search of the method")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                   "or sqlite:///./mlflow.db)")
    p.add_argument("--out", help="output path (default conf/tuned/<method>-<backbone>-"
                   "<dataset>.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--verbose", action="store_true", help="show MLflow's own INFO lines and "
                   "download bars, hidden by default")
    p.add_argument("--pick", default="best", help="which config: best (the search's best, "
                   "within its --max-seconds-per-image), fastest-within=D (the fastest config "
                   "of the Pareto front within D of the best score) or budget=B (the best of the "
                   "front within B seconds per image); default best")
    args = p.parse_args(argv)
    try:
        from search.core.console import quiet_libraries

        quiet_libraries(args.verbose)
        path = export(args.method, args.backbone, args.dataset, args.tracking_uri, args.out,
                      args.force, args.pick)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
