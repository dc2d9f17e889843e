"""Push to MLflow what a search could not log while its tracking store was down (the work of
``python -m search.sync``).

The search kept going (the trial callback of :mod:`search.record.trials` goes offline at the
first store error) and Tune
kept every trial's results in its results directory (``<storage>/<name>/``: one folder per
trial, ``_trainable_<trial_id>_<n>_...``, with ``params.json`` and ``result.json``, and the
trials' statuses in ``experiment_state-*.json``); the search wrote its best config there too.
This reads those files (JSON only, nothing unpickled) and makes the MLflow record whole: a child
run for each trial that has none (tag ``ovss_synced``), the end status of runs left RUNNING, and
the parent's best config and FINISHED status. It is idempotent: a second sync adds nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.base import OvssError

_TRIAL_DIR = re.compile(r"^_trainable_([0-9a-f]+)_(\d+)_")


@dataclass
class TrialOnDisk:
    trial_id: str
    number: int                    # 0-based creation number
    params: dict[str, Any]
    results: list[dict[str, Any]]  # every reported result, in order
    status: str                    # Tune's: TERMINATED, ERROR, RUNNING, PENDING, ...
    error: str = ""                # last line of the trial's error, when it failed
    extra: dict[str, Any] = field(default_factory=dict)


def trials_on_disk(exp_dir: Path) -> list[TrialOnDisk]:
    statuses: dict[str, str] = {}
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if states:
        for entry in json.loads(states[-1].read_text()).get("trial_data", []):
            meta = json.loads(entry[0]) if isinstance(entry, list) else {}
            if "trial_id" in meta:
                statuses[meta["trial_id"]] = str(meta.get("status", ""))
    out = []
    for d in sorted(exp_dir.iterdir()):
        m = _TRIAL_DIR.match(d.name)
        if not d.is_dir() or not m:
            continue
        params = json.loads((d / "params.json").read_text()) if (d / "params.json").is_file() \
            else {}
        results = []
        if (d / "result.json").is_file():
            for line in (d / "result.json").read_text().splitlines():
                if line.strip():
                    results.append(json.loads(line))
        error = ""
        for name in ("error.txt",):
            if (d / name).is_file():
                lines = [x for x in (d / name).read_text(errors="replace").splitlines()
                         if x.strip()]
                error = lines[-1].strip() if lines else ""
        out.append(TrialOnDisk(m.group(1), int(m.group(2)) - 1, params, results,
                               statuses.get(m.group(1), ""), error))
    return out


def _final(trial: TrialOnDisk) -> dict[str, Any] | None:
    last = trial.results[-1] if trial.results else None
    if last and int(last.get("rung", 0)) + 1 >= int(last.get("rungs_total", 1)):
        return last
    return None


def sync(name: str, storage: str | Path, tracking_uri: str) -> dict[str, int]:
    """Make the MLflow record of the search ``name`` whole from Tune's results directory."""
    from mlflow.tracking import MlflowClient

    from search.core.preflight import check_tracking_store
    from search.record import tracking

    exp_dir = Path(storage).resolve() / name
    if not exp_dir.is_dir():
        raise OvssError(f"no Tune results of a search named {name!r} under {Path(storage)}")
    check_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, f"tags.{tracking.TAG_ROLE} = 'search' and "
                                 f"tags.ovss_search_name = '{name}'",
                                 order_by=["attributes.start_time DESC"], max_results=1) \
        if exps else []
    if not parents:
        raise OvssError(f"no search named {name!r} in the MLflow store {tracking_uri}")
    parent = parents[0]
    pid, exp_id = parent.info.run_id, parent.info.experiment_id
    metric = "clip_score" if parent.data.tags.get("ovss_reward") == "clip" else "miou"
    source = parent.data.tags.get("ovss_presence_source", "model")
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{pid}'",
                                  max_results=50000)
    by_trial = {c.data.tags.get("ovss_trial_id"): c for c in children
                if "ovss_orphaned" not in c.data.tags}
    counts = {"created": 0, "completed": 0, "unchanged": 0, "parent": 0}
    for t in trials_on_disk(exp_dir):
        run = by_trial.get(t.trial_id)
        if run is not None and run.info.status != "RUNNING":
            counts["unchanged"] += 1
            continue
        if run is None:
            run_id = client.create_run(exp_id, run_name=f"trial-{t.number:03d}", tags={
                "mlflow.parentRunId": pid, tracking.TAG_ROLE: "trial",
                "ovss_trial_id": t.trial_id, "ovss_trial_number": str(t.number),
                "ovss_presence_source": source, "ovss_synced": "true"}).info.run_id
            tracking.log_params(client, run_id, t.params)
            for res in t.results:
                tracking.log_metrics(client, run_id, {f"rung/{metric}": res.get("score"),
                                                      "rung/images": res.get("images")},
                                     int(res.get("images", 0)))
            counts["created"] += 1
        else:
            run_id = run.info.run_id
            counts["completed"] += 1
        final = _final(t)
        if t.status == "ERROR":
            client.set_tag(run_id, "ovss_error", (t.error or "trial failed")[:500])
            status = "FAILED"
        elif t.status == "TERMINATED":
            if final is not None:
                keep = {k: v for k, v in final.items()
                        if k.startswith(tracking.FINAL_METRIC_PREFIXES)}
                tracking.log_metrics(client, run_id, {"score": final.get("score"),
                                                      metric: final.get("score"),
                                                      "images": final.get("images"), **keep},
                                     int(final.get("images", 0)))
            elif t.results:
                client.set_tag(run_id, "ovss_pruned", f"stopped by ASHA after rung "
                               f"{int(t.results[-1].get('rung', 0))}")
            status = "FINISHED"
        else:
            status = "KILLED"
        client.set_terminated(run_id, status=status)
    best = exp_dir / "best_config.yaml"
    arts = {a.path for a in client.list_artifacts(pid)}
    if best.is_file() and "best_config.yaml" not in arts:
        import yaml

        config = yaml.safe_load(best.read_text())
        client.log_artifact(pid, str(best))
        score = (config.get("metric") or {}).get("value")
        if isinstance(score, (int, float)) and math.isfinite(score):
            tracking.log_metrics(client, pid, {"best_score": score}, 0)
        for k in config.get("searched", []):
            client.set_tag(pid, f"best.{k}", str(config["params"].get(k)))
        client.set_tag(pid, "ovss_synced", "true")
        client.set_terminated(pid, status="FINISHED")
        counts["parent"] = 1
    return counts
