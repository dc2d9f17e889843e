"""``python -m search.export``: the best config of the latest search -> conf/tuned/*.yaml.

The file carries its provenance (MLflow run ids, metric, data set, code version) and everything
``methods.infer`` needs to rebuild the segmenter (backbone spec, settings, full knob values), so it
keeps working when conf/methods/ changes. It never overwrites an existing file without --force,
and it writes through ``methods.io.atomic_write``, so a failure leaves no half-written export.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from methods.base import CONF_DIR, OvssError


def export(method: str, backbone: str | None = None, dataset: str | None = None,
           tracking_uri: str | None = None, out: str | os.PathLike | None = None,
           force: bool = False) -> Path:
    from mlflow.tracking import MlflowClient

    from search.tracking import default_tracking_uri, latest_search_run

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise OvssError(f"no MLflow store at {uri}: run a search first or give --tracking-uri")
    client = MlflowClient(uri)
    run = latest_search_run(client, method, backbone, dataset)
    if run is None:
        what = " ".join(x for x in [method, backbone, dataset] if x)
        raise OvssError(f"no finished search of {what} in the MLflow store {uri}")
    with tempfile.TemporaryDirectory() as d:
        try:
            local = client.download_artifacts(run.info.run_id, "best_config.yaml", d)
        except Exception:
            raise OvssError(f"run {run.info.run_id} has no best_config.yaml artifact") from None
        config = yaml.safe_load(Path(local).read_text())
    config.setdefault("provenance", {})["exported_from"] = run.info.run_id
    name = f"{config['method']}-{config['backbone_name']}-{config['dataset']}.yaml"
    path = Path(out) if out else CONF_DIR / "tuned" / name
    if path.exists() and not force:
        raise OvssError(f"{path} exists: pass --force to overwrite")
    from methods.io import atomic_write

    text = yaml.safe_dump(config, sort_keys=False)
    if not atomic_write(path, text, overwrite=force):   # without --force: never replace a file
        raise OvssError(f"{path} exists: pass --force to overwrite")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from methods import known_methods

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
    args = p.parse_args(argv)
    try:
        path = export(args.method, args.backbone, args.dataset, args.tracking_uri, args.out,
                      args.force)
    except OvssError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
