"""Held-out images in a search (search.run --holdout / default fifth): kept out of tuning,
scored after it with the best config and the paper defaults, logged on the parent run."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.run import main as run_main
from tests.test_evaluate import PAPER, direct_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def voc20_root(tmp_path_factory):
    from search.data.synthetic import make_dataset

    return make_dataset("voc", tmp_path_factory.mktemp("voc20"), n=20, seed=1)


def _direct(root, params, ids):
    """mIoU over the images ``ids`` by direct counting."""
    return direct_scores(root, params, ids=ids)[0]


@pytest.mark.ready_store
def test_default_holdout_is_a_fifth_and_scored(ray_session, workdir, voc20_root, capsys):
    rc = run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc20_root),
                   "--num-samples", "6", "--rungs", "2", "--seed", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    assert "holdout: 4 of 20 images kept out of tuning" in cap.err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'")[0]
    held = parent.data.tags["ovss_holdout_images"].split(",")
    assert len(held) == 4
    trials = client.search_runs([exp.experiment_id], "tags.ovss_role = 'trial'")
    assert max(t.data.metrics["rung/images"] for t in trials) == 16   # tuned on the other 16
    m = parent.data.metrics
    best = {**PAPER, **yaml.safe_load(open(client.download_artifacts(
        parent.info.run_id, "best_config.yaml", str(workdir))))["params"]}
    assert m["holdout_miou_best"] == pytest.approx(_direct(voc20_root, best, set(held)))
    assert m["holdout_miou_default"] == pytest.approx(_direct(voc20_root, PAPER, set(held)))
    assert m["holdout_miou_gap"] == pytest.approx(m["holdout_miou_best"] -
                                                  m["holdout_miou_default"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"holdout_table.csv", "holdout_table.md"} <= arts
    # The parent's description: best config, holdout comparison, export command.
    note = parent.data.tags["mlflow.note.content"]
    assert "## Held-out images" in note and "python -m search.export --method toy" in note
    assert "temp:" in note
    # The tuning images as a dataset input on the parent and on every child run.
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "voc21/val"
    profile = json.loads(inputs[0].dataset.profile)
    assert profile["images"] == 16 and profile["held_out"] == 4
    child = client.get_run(trials[0].info.run_id).inputs.dataset_inputs
    assert [d.dataset.digest for d in child] == [inputs[0].dataset.digest]
    # The summary printed last names the holdout comparison.
    out = cap.out.strip().splitlines()
    assert any(line.startswith("holdout (4 images): mIoU tuned") and line.count(" %") == 2
               for line in out)
    assert out[-2] == "export the best config:"
    # The next steps run as printed in a fresh shell without the virtual environment.
    _runs_in_a_fresh_shell(out, workdir)


def _runs_in_a_fresh_shell(out: list[str], workdir) -> None:
    """The printed export command writes the config, and the printed ``mlflow ui`` command
    serves the printed runs-table page, each run by bash with a PATH that has no venv."""
    import os
    import shlex
    import subprocess

    from tests.servers import free_port, group_commands, http_status, job_runner, stop

    # A fresh shell: no virtual environment on PATH; only the test method's registration
    # (tests/conftest.py: the toy method lives in tests/) comes along.
    fresh = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8",
             **{k: os.environ[k] for k in ("OVSS_CONF_PATH", "OVSS_METHOD_MODULES",
                                           "PYTHONPATH")}}
    export = out[-1].strip()
    target = workdir / "exported.yaml"
    res = subprocess.run(["bash", "-c", f"{export} --out {shlex.quote(str(target))}"],
                         env=fresh, cwd="/", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and target.is_file(), res.stderr[-2000:]
    assert yaml.safe_load(target.read_text())["method"] == "toy"
    i = next(i for i, line in enumerate(out) if line.startswith("runs table: "))
    url = out[i].split("runs table: ", 1)[1].split(",", 1)[0]
    ui, port = out[i + 1].strip(), free_port()
    log = open(workdir / "ui.log", "w")
    proc = subprocess.Popen(["bash", "-c", f"exec {ui} --port {port}"], env=fresh, cwd="/",
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        page = url.replace("127.0.0.1:5000", f"127.0.0.1:{port}").split("#", 1)[0]
        deadline, status = time.time() + 180, 0
        while status != 200 and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            status = http_status(page, timeout=20)
        assert status == 200, (workdir / "ui.log").read_text()[-2000:]
        assert job_runner(proc.pid) == []   # the printed UI command leaves MLflow's job runner off
        # ... and serves from one process: no uvicorn workers spawned beside it (MLflow's default
        # of 4 spawns four)
        assert [c for c in group_commands(proc.pid) if "spawn_main" in c] == []
    finally:
        stop(proc)
        log.close()


def test_small_set_holds_nothing_out_by_default(ray_session, workdir, voc_root, capsys):
    rc = run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                   "--num-samples", "2", "--rungs", "1"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "holdout: none (8 images" in cap.err
    # Tune's banners stay off stdout; the progress line is on stderr; the summary is stdout.
    assert "Configuration for experiment" not in cap.out
    assert "trials 2/2 done" in cap.err
    assert cap.out.startswith("best mIoU ")
    # The libraries' own chatter stays behind --verbose.
    for noise in ("A new study created", "View detailed results", "Downloading artifacts",
                  "Token authentication is enabled", "INFO mlflow"):
        assert noise not in cap.err


def test_holdout_as_large_as_the_data_is_refused_before_ray(workdir, voc_root, capsys):
    rc = run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                   "--holdout", "8"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --holdout 8: the data set has only 8 image(s), none would be "
                       "left to tune on")
    assert not (workdir / "mlflow.db").exists()
