"""Trial numbering in MLflow follows the searcher's creation order, not the start order."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from search.tracking import MlflowTrialCallback


def test_trial_numbers_follow_creation_order_when_trials_start_out_of_order(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("numbering")
    parent = client.create_run(exp_id).info.run_id
    cb = MlflowTrialCallback(uri, exp_id, parent, "miou", {"backbone": "tiny"})
    # Tune tags trials "<1-based counter>_<params>"; the third-created trial starts first.
    made = [SimpleNamespace(trial_id=f"t{i}", experiment_tag=f"{i + 1}_temp={i}",
                            config={"temp": float(i)}) for i in range(3)]
    for trial in (made[2], made[0], made[1]):
        cb.on_trial_start(0, made, trial)
    runs = {r.data.tags["ovss_trial_id"]: r for r in client.search_runs([exp_id])
            if r.data.tags.get("ovss_role") == "trial"}
    assert {t: int(r.data.tags["ovss_trial_number"]) for t, r in runs.items()} == \
        {"t0": 0, "t1": 1, "t2": 2}
    assert runs["t0"].info.run_name == "trial-000"
    assert float(runs["t0"].data.params["temp"]) == 0.0
    # A trial without Tune's tag falls back to the order it was first seen.
    cb.on_trial_start(0, made, SimpleNamespace(trial_id="x", experiment_tag="", config={}))
    assert cb.numbers["x"] == 3
