"""MLflow tracking: one experiment per (method, backbone, dataset), one parent run per search, one
nested child run per trial.

All logging happens in the driver (a Ray Tune callback), so trials on other nodes of a cluster never
need to reach the tracking store: a local sqlite file works on a cluster too. Every run this module
starts ends FINISHED, FAILED or KILLED: :func:`parent_run` closes the parent on any exit and
:meth:`MlflowTrialCallback.close_open_runs` closes children that Tune never finished.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

TAG_ROLE = "ovss_role"
EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the MLflow 3 UI (mlflow/server/js)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(method: str, backbone: str, dataset: str) -> str:
    return f"{method}/{backbone}/{dataset}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # Without this tag the MLflow 3 UI opens a new experiment on its GenAI overview (traces);
    # "custom_model_development" opens it on the runs table.
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
        client.set_terminated(run_id, status=status)


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import math
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; class names may hold other characters.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def _creation_number(trial, fallback: int) -> int:
    """The trial's place in the order the searcher created it (0 = the paper defaults).

    Tune's search generator tags each trial "<counter>_<params>" with a 1-based counter that
    survives --resume; trials can *start* in another order when several wait for resources, so
    the start order is not the creation order."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() and int(head) > 0 else fallback


class MlflowTrialCallback(tune.Callback):
    """Logs each Tune trial as a child run of the search's parent run (in the driver)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 metric_name: str, fixed_params: Mapping[str, Any]):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric_name = metric_name
        self.fixed_params = dict(fixed_params)
        self.runs: dict[str, str] = {}      # trial_id -> run_id
        self.numbers: dict[str, int] = {}   # trial_id -> 0-based trial number
        self.last: dict[str, dict] = {}     # trial_id -> last result
        self.ended: set[str] = set()        # trial_ids that completed or failed
        self.dataset_input = None           # mlflow DatasetInput logged on every child run
        self._client: MlflowClient | None = None

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        d = dict(self.__dict__)
        d["_client"] = None
        return d

    # Tune checkpoints callback state with the experiment, so --resume keeps logging each
    # trial into its own child run.
    def get_state(self) -> dict:
        return {"runs": self.runs, "numbers": self.numbers, "last": self.last,
                "ended": sorted(self.ended)}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.numbers.update(state.get("numbers", {}))
        self.last.update(state.get("last", {}))
        self.ended.update(state.get("ended", []))

    def unfinished(self) -> list[str]:
        """Trials that started but neither completed nor failed (the search was interrupted)."""
        return [t for t in self.runs if t not in self.ended]

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _run_for(self, trial) -> str:
        if trial.trial_id not in self.runs:
            n = _creation_number(trial, fallback=len(self.numbers))
            self.numbers[trial.trial_id] = n
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial-{n:03d}",
                tags={"mlflow.parentRunId": self.parent_run_id, TAG_ROLE: "trial",
                      "ovss_trial_id": trial.trial_id, "ovss_trial_number": str(n)})
            self.runs[trial.trial_id] = run.info.run_id
            params = {**self.fixed_params, **(trial.config or {})}
            log_params(self.client, run.info.run_id, params)
            if getattr(self, "dataset_input", None) is not None:
                self.client.log_inputs(run.info.run_id, [self.dataset_input])
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        self.last[trial.trial_id] = dict(result)
        step = int(result.get("rung", result.get("training_iteration", 1) - 1))
        metrics = {"score": result.get("score"), self.metric_name: result.get("score"),
                   "images": result.get("images")}
        if "fidelity_miou" in result:
            metrics["fidelity_miou"] = result["fidelity_miou"]
        log_metrics(self.client, run_id, metrics, step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        last = self.last.get(trial.trial_id, {})
        details = {k: v for k, v in last.items() if k.startswith(("iou/", "aacc", "detail/"))}
        if details:
            log_metrics(self.client, run_id, details, int(last.get("rung", 0)))
        rungs_total = last.get("rungs_total")
        if rungs_total is not None and int(last.get("rung", 0)) + 1 < int(rungs_total):
            self.client.set_tag(run_id, "ovss_pruned", f"stopped by ASHA after rung "
                                f"{int(last.get('rung', 0))}")
        self.client.set_terminated(run_id, status="FINISHED")
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        err = getattr(trial, "error_file", None)
        if err:
            self.client.set_tag(run_id, "ovss_error_file", str(err))
        self.client.set_terminated(run_id, status="FAILED")
        self.ended.add(trial.trial_id)

    def close_open_runs(self, status: str = "KILLED") -> None:
        """End every child run still RUNNING (Ctrl-C, driver error)."""
        for run_id in self.runs.values():
            try:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status=status)
            except Exception:
                pass


def close_running_children(client: MlflowClient, experiment_id: str, parent_id: str,
                           status: str = "KILLED") -> None:
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = "
        f"'{RunStatus.to_string(RunStatus.RUNNING)}'", max_results=5000)
    for r in runs:
        client.set_terminated(r.info.run_id, status=status)


def previous_search_run(client: MlflowClient, experiment_id: str, name: str):
    """The newest parent run of the search ``name`` (reopened by --resume)."""
    runs = client.search_runs([experiment_id], f"tags.{TAG_ROLE} = 'search' and "
                              f"tags.ovss_search_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


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


__all__ = ["MlflowTrialCallback", "close_running_children", "default_tracking_uri",
           "ensure_experiment", "experiment_name", "latest_search_run", "log_metrics",
           "log_params", "mlflow", "parent_run", "RunStatus"]
