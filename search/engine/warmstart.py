"""``--warm-start RUN``, decided in phase 1 (before Ray): the best configs of an earlier search (a
parent run id, or a registered model ``models:/NAME/VERSION``, whose search run is read when it
is in this store) as points of this search's space, enqueued after the paper defaults. The
earlier search may be of another data set or backbone, never of another method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.base import OvssError


@dataclass
class WarmStart:
    points: list[dict[str, Any]] = field(default_factory=list)   # in the space, best first
    source: str = ""        # the run id the points came from (or the model URI)
    note: str = ""          # one line: what was enqueued, what was dropped or clipped


def _store(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    db = tracking_uri.removeprefix("sqlite:///")
    if tracking_uri.startswith("sqlite:///") and not Path(db).is_file():
        raise OvssError(f"--warm-start: no MLflow store at {tracking_uri} (give the "
                        "--tracking-uri of the earlier search)")
    return MlflowClient(tracking_uri)


def _search_run(client, run_id: str, method: str, what: str):
    try:
        run = client.get_run(run_id)
    except Exception:
        raise OvssError(f"--warm-start {what}: no MLflow run {run_id!r} in this store") \
            from None
    tags = run.data.tags
    if tags.get("ovss_role") != "search":
        raise OvssError(f"--warm-start {what}: run {run_id} is not a search's parent run "
                        f"(role {tags.get('ovss_role', 'none')})")
    if tags.get("ovss_method") != method:
        raise OvssError(f"--warm-start {what}: run {run_id} is a search of method "
                        f"{tags.get('ovss_method')}, not {method}")
    return run


def best_configs(client, run, k: int) -> list[dict[str, str]]:
    """The ``k`` best distinct configs (MLflow params of the searched knobs) among the trials of
    the search ``run`` scored on every tuning image, best score first."""
    exp = run.info.experiment_id
    children = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.ovss_role = 'trial' "
        "and attributes.status = 'FINISHED'", max_results=50000)
    scored = [c for c in children if "score" in c.data.metrics
              and "ovss_pruned" not in c.data.tags]
    scored.sort(key=lambda c: -c.data.metrics["score"])
    out: list[dict[str, str]] = []
    for c in scored:
        params = dict(c.data.params)
        if params not in out:
            out.append(params)
        if len(out) == k:
            break
    return out


def warm_start(ref: str, method: str, space: Mapping[str, Any], defaults: Mapping[str, Any],
               tracking_uri: str, k: int) -> WarmStart:
    """Read, check and fit the earlier search's best ``k`` configs (one-line OvssError for a run
    that is missing, not a search, of another method, or without a scored trial)."""
    from search.core.space import fit_to_space, trial0

    if k < 1:
        raise OvssError(f"--warm-start-top {k}: must be at least 1")
    client = _store(tracking_uri)
    configs: list[Mapping[str, Any]]
    if ref.startswith("models:/"):
        from methods.mlflow_store import config_from_model_uri

        config = config_from_model_uri(ref, tracking_uri)
        if config.get("method") != method:
            raise OvssError(f"--warm-start {ref}: the model is a config of method "
                            f"{config.get('method')}, not {method}")
        parent = (config.get("provenance") or {}).get("parent_run_id")
        try:
            run = _search_run(client, parent, method, ref) if parent else None
        except OvssError:
            run = None          # its search lives in another store: the model's config alone
        searched = config.get("searched") or list(config["params"])
        configs = (best_configs(client, run, k) if run is not None else
                   [{s: config["params"][s] for s in searched if s in config["params"]}])
        source = run.info.run_id if run is not None else ref
    else:
        run = _search_run(client, ref, method, ref)
        configs = best_configs(client, run, k)
        source = ref
    if not configs:
        raise OvssError(f"--warm-start {ref}: the search has no trial scored on every image")
    fill = trial0(defaults, space)
    points, notes = [], []
    for config in configs:
        point, changes = fit_to_space(config, space, fill)
        points.append(point)
        notes += [n for n in changes if n not in notes]
    note = (f"warm start: {len(points)} config(s) of search {source} enqueued after the paper "
            "defaults" + (f"; {'; '.join(notes)}" if notes else ""))
    return WarmStart(points, source, note)
