"""MLflow tracking: one experiment per (method, backbone, dataset), one parent run per search, one
nested child run per trial (:mod:`search.record.trials`).

All logging happens in the driver, so trials on other nodes of a cluster never need to reach the
tracking store: a local sqlite file works on a cluster too. Every run a search starts ends
FINISHED, FAILED or KILLED: :func:`parent_run` closes the parent on any exit and
:meth:`search.record.trials.MlflowTrialCallback.close_open_runs` closes children that Tune never
finished. The default store (``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``) is
:func:`methods.mlflow_store.default_tracking_uri`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

TAG_ROLE = "ovss_role"
EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the MLflow 3 UI (mlflow/server/js)


def experiment_name(method: str, backbone: str, dataset: str) -> str:
    return f"{method}/{backbone}/{dataset}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # The MLflow 3 UIs that read this tag open the experiment on its runs table; MLflow 3.17's
    # reads its workflow switch instead (search/mlflow_app.py, `mlflow server --app-name ovss`).
    return client.create_experiment(name, tags={EXPERIMENT_KIND: "custom_model_development"})


@contextlib.contextmanager
def parent_run(
    client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str],
    reopen: str | None = None,
) -> Iterator[str]:
    """Create the parent run (or reopen ``reopen`` when resuming); end it FINISHED on success,
    KILLED on Ctrl-C, FAILED otherwise."""
    if reopen:
        run_id = reopen
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "ovss_resumed", "true")
    else:
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={TAG_ROLE: "search", **tags})
        run_id = run.info.run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status=status)
        except Exception:  # noqa: BLE001 - the store is gone: search.sync closes it later
            if status == "FINISHED":
                raise


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


#: Keys of a trial's last result that its run keeps besides the headline score: per-class IoU,
#: aAcc, method details, timings, memory, and the CLIP reward's own counts (``clip_wins``,
#: ``clip_pairs``, ``clip_images``, ``clip_unscored_images``, ``clip_image_mean``), and a
#: cost-aware search's seconds per image and its parts (``cost/``, docs/cost.md).
FINAL_METRIC_PREFIXES = ("iou/", "aacc", "detail/", "time/", "worker/", "clip_", "cost/")


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                tags: Mapping[str, str] | None = None,
                why: Mapping[str, str] | None = None) -> None:
    """Numeric ``metrics`` at ``step`` (and ``tags``) in as few store calls as MLflow's batch
    limits allow (one for up to 500 metrics).

    Nothing vanishes without a word: a NaN value (an undefined metric: a rank correlation of a
    constant ranking, the IoU of a class absent from predictions and labels) is logged as NaN,
    which MLflow stores and shows; ``why[key]`` says why it is undefined, as the tag
    ``ovss_undefined/<key>``. An infinite value cannot be stored: it is left out and named by
    the tag ``ovss_nonfinite/<key>``. Non-numeric values (None, strings) are skipped."""
    import math
    import time

    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    numbers = {_metric_key(k): float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    items = [Metric(k, v, ts, step) for k, v in numbers.items() if not math.isinf(v)]
    tag_map = {k: str(v)[:8000] for k, v in (tags or {}).items()}
    for k, v in numbers.items():
        if math.isinf(v):
            tag_map[f"ovss_nonfinite/{k}"] = f"{v} (not stored)"
        elif math.isnan(v) and why and why.get(k):
            tag_map[f"ovss_undefined/{k}"] = str(why[k])[:8000]
    tag_items = [RunTag(k, v) for k, v in tag_map.items()]
    for i in range(0, max(len(items), 1 if tag_items else 0), 500):
        client.log_batch(run_id, metrics=items[i:i + 500],
                         tags=tag_items if i == 0 else [])


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; class names may hold other characters.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def close_running_children(client: MlflowClient, experiment_id: str, parent_id: str,
                           status: str = "KILLED") -> None:
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = "
        f"'{RunStatus.to_string(RunStatus.RUNNING)}'", max_results=5000)
    for r in runs:
        client.set_terminated(r.info.run_id, status=status)


def previous_search(client: MlflowClient, experiment_id: str, name: str):
    """The newest parent run (an mlflow Run) of the search ``name`` (reopened by --resume)."""
    runs = client.search_runs([experiment_id], f"tags.{TAG_ROLE} = 'search' and "
                              f"tags.ovss_search_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def latest_search_run(client: MlflowClient, method: str, backbone: str | None,
                      dataset: str | None):
    """The newest FINISHED parent run of ``method`` (optionally backbone/dataset) in the store."""
    filt = [f"tags.{TAG_ROLE} = 'search'", f"tags.ovss_method = '{method}'",
            "attributes.status = 'FINISHED'"]
    if backbone:
        filt.append(f"tags.ovss_backbone = '{backbone}'")
    if dataset:
        filt.append(f"tags.ovss_dataset = '{dataset}'")
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, " and ".join(filt), order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def dataset_input(plan, context: str = "tuning"):
    """The tuning images of a search plan as an MLflow dataset input: name, root, split, image
    count and a digest of the image hashes (what the MLflow UI shows under a run's Datasets)."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    kw = plan.data_kwargs
    digest = hashlib.sha256("".join(it.image_hash for it in plan.items).encode()).hexdigest()
    profile = {"images": len(plan.items), "split": kw["split"], "root": kw["root"],
               "classes": len(plan.classes.names),
               "held_out": len(plan.holdout.items) if plan.holdout else 0}
    ds = Dataset(name=f"{plan.dataset_name}/{kw['split']}", digest=digest[:16],
                 source_type="local", source=json.dumps({"uri": kw["root"]}),
                 profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def ui_link(tracking_uri: str, experiment_id: str) -> tuple[str, str | None]:
    """``(url, command)``: where the MLflow UI shows the experiment's runs table, and the command
    that serves it (None for a tracking server, which serves it already). MLflow 3.17's UI picks
    GenAI or model-training pages from a workflow switch (URL ``workflowType``, else the browser's
    last choice, GenAI at first), which wins over the experiment's ``mlflow.experimentKind`` tag:
    the link names the view, and a local UI is started with ``--app-name ovss``
    (:mod:`search.mlflow_app`), which opens runs tables without it, and with one worker process:
    MLflow's default of 4 is for a shared server, and a local UI for one user started 4 uvicorn
    workers, each importing MLflow (`python bench/mlflow_server.py --ui-workers`, 2-core machine,
    medians of 3: /health after 15.7 s and 24.6 CPU-s with 4, 12.2 s and 12.3 CPU-s with 1). The
    command runs as printed (:func:`search.core.console.mlflow_server_command`)."""
    from search.core.console import mlflow_server_command

    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}", None
    return (f"http://127.0.0.1:5000/{page}",
            mlflow_server_command("ui", "--app-name", "ovss", "--workers", "1",
                                  "--backend-store-uri", tracking_uri))
