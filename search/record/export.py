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
           force: bool = False, pick: str = "best") -> Path:
    """Write the config ``pick`` chooses (:func:`search.core.front.parse_pick`: ``best``, the
    search's best config within its budget; ``fastest-within=D`` or ``budget=B``: from the
    run's Pareto front) of the latest finished search."""
    from mlflow.tracking import MlflowClient

    from methods.mlflow_store import default_tracking_uri
    from search.core.front import parse_pick
    from search.record.tracking import latest_search_run

    rule, value = parse_pick(pick)
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
        if rule != "best":
            config = pick_from_front(client, run.info.run_id, config, rule, value, d)
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


def pick_from_front(client, run_id: str, config: dict, rule: str, value: float | None,
                    tmp: str) -> dict:
    """``config`` (the run's best config) with the knobs of the front member ``rule`` picks;
    one-line OvssError when the run has no front or no member fits."""
    from pydantic import TypeAdapter

    from methods.spec import SpaceParam
    from search.core.front import FRONT_CSV, pick, read_front

    try:
        text = Path(client.download_artifacts(run_id, FRONT_CSV, tmp)).read_text()
        doc = yaml.safe_load(Path(client.download_artifacts(run_id, "search_space.yaml",
                                                            tmp)).read_text())
    except Exception:
        raise OvssError(f"--pick {rule}: search run {run_id} has no Pareto front "
                        f"({FRONT_CSV}); search with --objectives <reward>,seconds or "
                        "--max-seconds-per-image") from None
    space = TypeAdapter(dict[str, SpaceParam]).validate_python(doc)
    chosen = pick(read_front(text, space, config["metric"]["name"]), rule, value)
    out = dict(config)
    out["params"] = {**config["params"], **chosen["params"]}
    out["metric"] = {**config["metric"], "value": chosen["score"]}
    out["cost"] = {**(config.get("cost") or {}), "seconds_per_image": chosen["seconds"]}
    out["pick"] = rule if value is None else f"{rule}={value:g}"
    out["provenance"] = {**config.get("provenance", {}), "trial_run_id": chosen["run_id"]}
    return out
