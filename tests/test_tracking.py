"""Trial numbering in MLflow follows the searcher's creation order, not the start order."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from search.record.trials import MlflowTrialCallback


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
    cb.flush()
    runs = {r.data.tags["ovss_trial_id"]: r for r in client.search_runs([exp_id])
            if r.data.tags.get("ovss_role") == "trial"}
    assert {t: int(r.data.tags["ovss_trial_number"]) for t, r in runs.items()} == \
        {"t0": 0, "t1": 1, "t2": 2}
    assert runs["t0"].info.run_name == "trial-000"
    assert float(runs["t0"].data.params["temp"]) == 0.0
    # A trial without Tune's tag falls back to the order it was first seen.
    cb.on_trial_start(0, made, SimpleNamespace(trial_id="x", experiment_tag="", config={}))
    assert cb.numbers["x"] == 3


def _setup(tmp_path, name="writer"):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id).info.run_id
    return uri, client, exp_id, parent


def _trial(i, status="RUNNING", **kw):
    return SimpleNamespace(trial_id=f"t{i}", experiment_tag=f"{i + 1}_x", config={"temp": i},
                           status=status, **kw)


def _children(client, exp_id):
    return {r.data.tags["ovss_trial_id"]: r for r in client.search_runs([exp_id])
            if r.data.tags.get("ovss_role") == "trial"}


def test_tunes_loop_does_not_wait_for_the_store_and_the_record_is_complete_after_flush(
        tmp_path, monkeypatch):
    import threading
    import time

    uri, client, exp_id, parent = _setup(tmp_path)
    cb = MlflowTrialCallback(uri, exp_id, parent, "miou", {})
    slow = threading.Event()
    real = MlflowClient.log_batch

    def log_batch(self, *a, **k):
        slow.wait(5)                   # the store answers only once the test lets it
        return real(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    trials = [_trial(i) for i in range(3)]
    t0 = time.perf_counter()
    for t in trials:
        cb.on_trial_start(0, trials, t)
        cb.on_trial_result(0, trials, t, {"score": 0.1 * t.config["temp"], "images": 2,
                                          "rung": 0, "rungs_total": 1, "node_ip": "1.2.3.4"})
        cb.on_trial_complete(0, trials, t)
    assert time.perf_counter() - t0 < 2.0          # the hooks returned without the store
    slow.set()
    assert cb.get_state() is None                   # Tune saves its state after this returns
    runs = _children(client, exp_id)
    assert sorted(runs) == ["t0", "t1", "t2"]
    for t in trials:
        r = runs[t.trial_id]
        assert r.info.status == "FINISHED"
        assert r.data.metrics["miou"] == 0.1 * t.config["temp"]
        assert r.data.tags["ovss_node_ip"] == "1.2.3.4"
        assert float(r.data.params["temp"]) == t.config["temp"]


def test_a_trial_costs_six_store_calls(tmp_path, monkeypatch):
    uri, client, exp_id, parent = _setup(tmp_path)
    cb = MlflowTrialCallback(uri, exp_id, parent, "miou", {"backbone": "tiny"})
    calls = []
    for name in ("create_run", "log_batch", "log_inputs", "set_tag", "set_terminated",
                 "update_run", "log_metric", "log_param"):
        real = getattr(MlflowClient, name)
        monkeypatch.setattr(MlflowClient, name,
                            lambda self, *a, _r=real, _n=name, **k: calls.append(_n) or
                            _r(self, *a, **k))
    t = _trial(0)
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, {"score": 0.5, "images": 2, "rung": 0, "rungs_total": 2,
                                   "node_id": "n", "node_ip": "i", "device": "cpu"})
    cb.on_trial_result(0, [t], t, {"score": 0.6, "images": 4, "rung": 1, "rungs_total": 2,
                                   "time/decode_s": 1.0})
    cb.on_trial_complete(0, [t], t)
    cb.flush()
    # run, params, two rung results (the first with the node tags), final metrics, end status
    assert calls == ["create_run", "log_batch", "log_batch", "log_batch", "log_batch",
                     "set_terminated"]
    r = _children(client, exp_id)["t0"]
    assert r.data.tags["ovss_device"] == "cpu" and r.data.metrics["miou"] == 0.6
    assert [m.step for m in client.get_metric_history(r.info.run_id, "rung/miou")] == [2, 4]


def test_a_failing_store_is_reported_once_and_later_calls_are_dropped(tmp_path, monkeypatch,
                                                                       capsys):
    uri, client, exp_id, parent = _setup(tmp_path)
    cb = MlflowTrialCallback(uri, exp_id, parent, "miou", {})
    calls = []

    def broken(self, *a, **k):
        calls.append(1)
        raise ConnectionError("store is gone")

    monkeypatch.setattr(MlflowClient, "create_run", broken)
    trials = [_trial(i) for i in range(3)]
    for t in trials:
        cb.on_trial_start(0, trials, t)
        cb.on_trial_complete(0, trials, t)
    cb.flush()
    assert cb.offline and "store is gone" in cb.offline
    assert calls == [1]                                # nothing after the first failure
    assert capsys.readouterr().err.count("warning: the MLflow store") == 1
    cb.close_open_runs()                               # offline: no store calls, no error


def test_reconcile_records_a_trial_tune_saw_end_whose_run_was_never_written(tmp_path):
    uri, client, exp_id, parent = _setup(tmp_path)
    # The dead driver wrote t0's run (left RUNNING); t1 ended in Tune's saved state before its
    # run reached the store.
    dead = MlflowTrialCallback(uri, exp_id, parent, "miou", {})
    done = {"score": 0.25, "images": 2, "rung": 0, "rungs_total": 1}
    t0, t1 = _trial(0, "TERMINATED", last_result=done), _trial(1, "TERMINATED", last_result=done)
    dead.on_trial_start(0, [t0], t0)
    dead.flush()
    cb = MlflowTrialCallback(uri, exp_id, parent, "miou", {})
    cb.reconcile([t0, t1])
    runs = _children(client, exp_id)
    assert sorted(runs) == ["t0", "t1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["miou"] == 0.25
               for r in runs.values())
    assert runs["t1"].data.tags["ovss_trial_number"] == "1"
