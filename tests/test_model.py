"""The tuned config as an MLflow model: logged on the search's parent run, registered with
--register, loaded back by pyfunc, methods.infer and search.evaluate (models:/NAME/VERSION), and
served over HTTP by `mlflow models serve`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from methods.infer import main as infer_main
from search.evaluate import main as evaluate_main
from search.run import main as run_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(ray_session, tmp_path_factory, voc_root):
    d = tmp_path_factory.mktemp("model")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    rc = run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                   "--num-samples", "4", "--rungs", "1", "--seed", "2", "--register", "toyseg",
                   "--tracking-uri", uri, "--cache-dir", str(d / "cache"),
                   "--storage", str(d / "ray")])
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    parent = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'")[0]
    cfg = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "best_config.yaml",
                                                        str(d))))
    return {"uri": uri, "dir": d, "parent": parent, "config": cfg, "client": client,
            "exp": exp}


def _image(voc_root):
    from methods.io import load_image

    path = sorted((voc_root / "JPEGImages").iterdir())[0]
    return path, load_image(path)


def test_model_logged_registered_and_loaded(registered, voc_root, tmp_path, capsys):
    import mlflow

    from methods.infer import TunedSegmenter
    from methods.mlflow_store import using_tracking_uri
    from search.record.model import encode_image

    client, parent = registered["client"], registered["parent"]
    assert parent.data.tags["ovss_model_uri"] == "models:/toyseg/1"
    models = client.search_logged_models(experiment_ids=[registered["exp"].experiment_id])
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    assert client.get_model_version("toyseg", "1").run_id == parent.info.run_id
    assert "models:/toyseg/1" in parent.data.tags["mlflow.note.content"]
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ   # the search put the global URI back

    path, image = _image(voc_root)
    want = TunedSegmenter(registered["config"])(image, ["cat", "dog", "car"])
    with using_tracking_uri(registered["uri"]):
        model = mlflow.pyfunc.load_model("models:/toyseg/1")
    got = model.predict([{"image": encode_image(image), "classes": "cat,dog,car"}])
    assert np.array_equal(np.array(got[0]), want)

    # methods.infer reads the registered model.
    out = tmp_path / "pred.png"
    assert infer_main(["--config", "models:/toyseg/1", "--tracking-uri", registered["uri"],
                       "--image", str(path), "--classes", "cat,dog,car", "--out", str(out)]) == 0
    from methods.io import load_label

    assert np.array_equal(load_label(out), want)

    # search.evaluate --model scores the same knobs as the config file.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(registered["config"]))
    common = ["--dataset", "voc21", "--data-root", str(voc_root), "--tracking-uri",
              registered["uri"], "--cache-dir", str(registered["dir"] / "cache")]
    assert evaluate_main(["--model", "models:/toyseg/1", *common]) == 0
    assert evaluate_main(["--config", str(cfg_file), *common]) == 0
    assert evaluate_main(["--run", parent.info.run_id, *common]) == 0
    evals = client.search_runs([registered["exp"].experiment_id],
                               "tags.ovss_role = 'evaluation'")
    assert len(evals) == 3
    assert len({e.data.metrics["miou"] for e in evals}) == 1
    assert {e.data.tags["ovss_source"] for e in evals} == {
        "models:/toyseg/1", str(cfg_file), f"run:{parent.info.run_id}"}
    assert {e.data.tags["ovss_search_run"] for e in evals} == {parent.info.run_id}


def test_missing_registered_model_refused(registered, voc_root, tmp_path, capsys):
    path, _ = _image(voc_root)
    assert infer_main(["--config", "models:/nosuch/1", "--tracking-uri", registered["uri"],
                       "--image", str(path), "--classes", "cat", "--out",
                       str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no registered model 'nosuch' version 1")
    assert evaluate_main(["--model", "models:/toyseg/7", "--dataset", "voc21", "--data-root",
                          str(voc_root), "--tracking-uri", registered["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no registered model 'toyseg' version 7")
    assert not (tmp_path / "p.png").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_model_answers_a_label_map(registered, voc_root):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from methods.infer import TunedSegmenter
    from search.record.model import encode_image

    port = _free_port()
    # mlflow runs `uvicorn` from PATH: put this interpreter's bin first (a venv not activated).
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/toyseg/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=registered["dir"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-3000:]) from None
                time.sleep(1)
        _, image = _image(voc_root)
        body = json.dumps({"dataframe_records": [{"image": encode_image(image),
                                                  "classes": "cat,dog,car"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        got = np.array(answer["predictions"][0])
        want = TunedSegmenter(registered["config"])(image, ["cat", "dog", "car"])
        assert got.shape == image.shape[:2]
        assert np.array_equal(got, want)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # the server and the workers it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
