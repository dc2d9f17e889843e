"""``python -m search.sync``: push to MLflow what a search could not log while its tracking
store was down (:mod:`search.record.sync` does the work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from methods.base import OvssError


def main(argv: Sequence[str] | None = None) -> int:
    from methods.mlflow_store import default_tracking_uri
    from search.record.sync import sync

    p = argparse.ArgumentParser(prog="python -m search.sync", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="the search's --name")
    p.add_argument("--storage", default=".ovss/ray_results",
                   help="the search's --storage (default ./.ovss/ray_results)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                   "or sqlite:///./mlflow.db)")
    args = p.parse_args(argv)
    try:
        c = sync(args.name, args.storage, args.tracking_uri or default_tracking_uri())
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sync {args.name}: {c['created']} trial runs created, {c['completed']} completed, "
          f"{c['unchanged']} already there; parent {'finished' if c['parent'] else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
