"""One MLflow child run per Ray Tune trial, logged from the driver by a Tune callback.

MLflow, not Tune's checkpoint, is the record of which trial owns which run (see
:class:`MlflowTrialCallback`); a store that fails mid-search takes the record offline, not the
search (:mod:`search.record.writer`), and ``python -m search.sync`` makes it whole later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from search.record.tracking import FINAL_METRIC_PREFIXES, TAG_ROLE, log_metrics, log_params
from search.record.writer import Writer, guarded


def creation_number(trial, fallback: int) -> int:
    """The trial's place in the order the searcher created it (0 = the paper defaults).

    Tune's search generator tags each trial "<counter>_<params>" with a 1-based counter that
    survives --resume; trials can *start* in another order when several wait for resources, so
    the start order is not the creation order."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() and int(head) > 0 else fallback


class MlflowTrialCallback(tune.Callback):
    """Logs each Tune trial as a child run of the search's parent run (in the driver).

    MLflow, not Tune's checkpoint, is the record of which trial owns which run: every child run
    is tagged with its Tune ``trial_id``, and on the first step of a (resumed) search
    :meth:`reconcile` maps the trials Tune knows to their runs and closes the runs of a dead
    driver that the restored state does not know (KILLED, tagged ``ovss_orphaned``). Tune
    checkpoints its state at most every ~10 s, so those runs exist after a SIGKILL.

    The store calls run on one writer thread (:class:`search.record.writer.Writer`), in order;
    Tune's loop does not wait for them. :meth:`get_state` (called by Tune before it saves the
    experiment state) waits for them, so a saved state is never ahead of the record; so do
    :meth:`reconcile`, :meth:`flush` (end of the experiment) and :meth:`close_open_runs`. A
    trial costs one store call for its run and tags, one for its params (one more for its
    dataset input), one per result (the first carries the node tags), one for the final
    metrics, one for the end status.

    Metrics: the headline metric (``miou`` or ``clip_score``, and ``score``) is logged once, when a
    trial finishes its last rung; per-rung values go under ``rung/<metric>`` with step = number of
    images scored, so sorting children by the headline never ranks an early-stopped trial's
    few-image score above a fully scored one. A cost-aware search's trials also log
    ``cost/seconds_per_image`` and its parts (``cost/extract_s``, ``cost/extend_s``,
    ``cost/decode_s``) with the final metrics.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 metric_name: str, fixed_params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None):
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})        # set on every child run (e.g. the presence source)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric_name = metric_name
        self.fixed_params = dict(fixed_params)
        self.runs: dict[str, str] = {}      # trial_id -> run_id (written by the writer thread)
        self.numbers: dict[str, int] = {}   # trial_id -> 0-based trial number
        self.last: dict[str, dict] = {}     # trial_id -> last result
        self.ended: set[str] = set()        # trial_ids that completed or failed
        self.orphaned: list[str] = []       # run ids of a dead driver, closed KILLED
        self.reconciled = False
        self.offline: str | None = None     # the store error that stopped logging, if any
        self.dataset_input = None           # mlflow DatasetInput logged on every child run
        self._client: MlflowClient | None = None
        self._writer: Writer | None = None

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        d = dict(self.__dict__)
        d["_client"] = None
        d["_writer"] = None
        return d

    def go_offline(self, error: BaseException) -> None:
        import sys

        if self.offline:
            return
        line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        self.offline = line
        print(f"warning: the MLflow store {self.tracking_uri} failed ({line}); trials go on "
              "and their results stay in Tune's results directory; push them when it is back "
              "with python -m search.sync", file=sys.stderr)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _submit(self, call) -> None:
        if getattr(self, "_writer", None) is None:
            self._writer = Writer(self)
        self._writer.submit(call)

    def flush(self) -> None:
        """Wait for every store call handed to the writer thread."""
        if getattr(self, "_writer", None) is not None:
            self._writer.flush()

    def get_state(self):
        self.flush()      # Tune saves its experiment state next: the record is not behind it
        return None

    def on_experiment_end(self, trials, **info):
        self.flush()

    def _children(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}' and "
            f"tags.{TAG_ROLE} = 'trial'", max_results=50000,
            order_by=["attributes.start_time ASC"])

    @guarded
    def reconcile(self, trials) -> None:
        """Map the trials Tune knows (restored or new) to their existing child runs; close and
        tag the runs no known trial owns; record a trial Tune saw end whose run the dead
        driver never wrote. Runs once, before any trial of this driver starts."""
        if self.reconciled:
            return
        self.flush()
        self.reconciled = True
        known = {t.trial_id: t for t in trials}
        self.runs.clear()
        self.ended.clear()
        for run in self._children():
            tags = run.data.tags
            if "ovss_orphaned" in tags:
                continue
            tid = tags.get("ovss_trial_id")
            trial = known.get(tid)
            if trial is None or tid in self.runs:
                self._orphan(run, "no trial of the restored search state owns this run"
                             if trial is None else f"a second run of trial {tid}")
                continue
            self.runs[tid] = run.info.run_id
            self.numbers[tid] = int(tags.get("ovss_trial_number", len(self.numbers)))
            status = str(getattr(trial, "status", ""))
            if status in ("TERMINATED", "ERROR"):
                self.ended.add(tid)
                if run.info.status == "RUNNING":  # ended in Tune, the driver died before logging
                    self._record_end(trial, run.info.run_id)
        for tid, trial in known.items():
            status = str(getattr(trial, "status", ""))
            if tid not in self.runs and status in ("TERMINATED", "ERROR"):
                self._record_end(trial, self._run_id(*self._spec(trial)))
                self.ended.add(tid)

    def _record_end(self, trial, run_id: str) -> None:
        if str(getattr(trial, "status", "")) == "ERROR":
            self._log_error(getattr(trial, "error_file", None), run_id)
        else:
            self._log_final(run_id, dict(getattr(trial, "last_result", {}) or {}))

    def _orphan(self, run, why: str) -> None:
        run_id = run.info.run_id
        tags = run.data.tags
        if run.info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(run_id, status="KILLED")
        else:
            self.client.update_run(run_id, status="KILLED")
        self.client.set_tag(run_id, "ovss_orphaned", why)
        if "ovss_trial_number" in tags:
            self.client.set_tag(run_id, "ovss_orphaned_trial_number", tags["ovss_trial_number"])
            self.client.delete_tag(run_id, "ovss_trial_number")
        self.client.update_run(run_id, name=f"orphaned-{run.info.run_name}")
        self.orphaned.append(run_id)

    def _spec(self, trial) -> tuple[str, int, dict]:
        """(trial id, 0-based number, config), read from Tune's trial in the driver thread."""
        tid = trial.trial_id
        if tid not in self.numbers:
            self.numbers[tid] = creation_number(trial, fallback=len(self.numbers))
        return tid, self.numbers[tid], dict(trial.config or {})

    def _run_id(self, tid: str, n: int, config: dict) -> str:
        """The trial's child run, created on first use (writer thread, or after a flush)."""
        if tid not in self.runs:
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial-{n:03d}",
                tags={**self.tags, "mlflow.parentRunId": self.parent_run_id, TAG_ROLE: "trial",
                      "ovss_trial_id": tid, "ovss_trial_number": str(n)})
            self.runs[tid] = run.info.run_id
            log_params(self.client, run.info.run_id, {**self.fixed_params, **config})
            if getattr(self, "dataset_input", None) is not None:
                self.client.log_inputs(run.info.run_id, [self.dataset_input])
        return self.runs[tid]

    @guarded
    def on_step_begin(self, iteration, trials, **info):
        self.reconcile(trials)

    @guarded
    def on_trial_start(self, iteration, trials, trial, **info):
        self.reconcile(trials)
        spec = self._spec(trial)
        rerun = trial.trial_id in self.ended      # a resumed trial re-runs into its own run
        self.ended.discard(trial.trial_id)

        def call():
            run_id = self._run_id(*spec)
            if rerun:
                self.client.update_run(run_id, status="RUNNING")
                for tag in ("ovss_pruned", "ovss_error", "ovss_error_file"):
                    if tag in self.client.get_run(run_id).data.tags:
                        self.client.delete_tag(run_id, tag)

        self._submit(call)

    @guarded
    def on_trial_result(self, iteration, trials, trial, result, **info):
        spec = self._spec(trial)
        tags = {}
        if trial.trial_id not in self.last:   # first result of this driver: where it runs
            tags = {f"ovss_{k}": str(result[k]) for k in ("node_id", "node_ip", "device")
                    if k in result}
        self.last[trial.trial_id] = dict(result)
        step = int(result.get("images", result.get("training_iteration", 1)))
        metrics = {f"rung/{self.metric_name}": result.get("score"),
                   "rung/images": result.get("images")}
        if "fidelity_miou" in result:
            metrics["rung/fidelity_miou"] = result["fidelity_miou"]
        self._submit(lambda: log_metrics(self.client, self._run_id(*spec), metrics, step, tags))

    def _log_final(self, run_id: str, last: dict) -> None:
        rung, total = int(last.get("rung", 0)), last.get("rungs_total")
        if total is not None and rung + 1 < int(total):
            self.client.set_tag(run_id, "ovss_pruned", f"stopped by ASHA after rung {rung} "
                                f"({int(last.get('images', 0))} images)")
        elif last:
            final = {"score": last.get("score"), self.metric_name: last.get("score"),
                     "images": last.get("images")}
            if "fidelity_miou" in last:
                final["fidelity_miou"] = last["fidelity_miou"]
            final.update({k: v for k, v in last.items()
                          if k.startswith(FINAL_METRIC_PREFIXES)})
            log_metrics(self.client, run_id, final, int(last.get("images", 0)))
        self.client.set_terminated(run_id, status="FINISHED")

    @guarded
    def on_trial_complete(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        last = dict(self.last.get(trial.trial_id, {}))
        self._submit(lambda: self._log_final(self._run_id(*spec), last))
        self.ended.add(trial.trial_id)

    def _log_error(self, err: str | None, run_id: str) -> None:
        line = ""
        if err and Path(err).is_file():
            text = Path(err).read_text(errors="replace").strip()
            line = next((x.strip() for x in reversed(text.splitlines()) if x.strip()), "")
            try:
                self.client.log_artifact(run_id, str(err))
            except Exception:
                pass
        self.client.set_tag(run_id, "ovss_error", (line or "trial failed")[:500])
        if err:
            self.client.set_tag(run_id, "ovss_error_file", str(err))
        self.client.set_terminated(run_id, status="FAILED")

    @guarded
    def on_trial_error(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        err = getattr(trial, "error_file", None)
        self._submit(lambda: self._log_error(err, self._run_id(*spec)))
        self.ended.add(trial.trial_id)

    def close_open_runs(self, status: str = "KILLED") -> None:
        """End every child run still RUNNING (Ctrl-C, driver error)."""
        self.flush()
        if self.offline:
            return
        for run_id in self.runs.values():
            try:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status=status)
            except Exception:
                pass
