"""The best config of the latest search -> conf/tuned/*.yaml (the work of ``python -m
search.export``).

The file carries its provenance (MLflow run ids, metric, data set, code version) and everything
``methods.infer`` needs to rebuild the segmenter (backbone spec, settings, full knob values), so it
keeps working when conf/methods/ changes. It never overwrites an existing file without --force,
and it writes through ``methods.io.atomic_write``, so a failure leaves no half-written export.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from methods.base import CONF_DIR, OvssError


def export(method: str, backbone: str | None = None, dataset: str | None = None,
           tracking_uri: str | None = None, out: str | os.PathLike | None = None,
           force: bool = False) -> Path:
    from mlflow.tracking import MlflowClient

    from methods.mlflow_store import default_tracking_uri
    from search.record.tracking import latest_search_run

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
