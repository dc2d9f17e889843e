"""A real search (local Ray, Optuna TPE, ASHA, MLflow sqlite) checked through the MLflow client,
then exported and run through inference from the export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from methods.infer import main as infer_main
from search.export import main as export_main
from search.run import main as run_main

pytestmark = pytest.mark.slow


def _search(workdir, voc_root, *extra):
    return run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                     "--num-samples", "10", "--rungs", "3", "--seed", "3", *extra])


@pytest.mark.ready_store
def test_search_logs_everything_and_exports(ray_session, workdir, voc_root, capsys):
    assert _search(workdir, voc_root) == 0
    out = capsys.readouterr().out
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    children = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    assert len(parents) == 1 and len(children) == 10
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.info.status for c in children} == {"FINISHED"}
    # Trial 0 is the paper defaults (the YAML's defaults block).
    first = min(children, key=lambda c: int(c.data.tags["ovss_trial_number"]))
    assert float(first.data.params["temp"]) == pytest.approx(0.1)
    assert float(first.data.params["thr"]) == pytest.approx(0.3)
    assert first.data.params["mode"] == "linear" and first.data.params["pool"] == "1"
    # Every trial logs its score per rung under rung/miou (step = images scored, up to where
    # ASHA stopped it); only trials that saw every image carry the headline miou.
    histories = [client.get_metric_history(c.info.run_id, "rung/miou") for c in children]
    assert all(len(h) >= 1 for h in histories)
    assert max(len(h) for h in histories) == 3
    assert sorted(m.step for m in max(histories, key=len)) == [2, 4, 8]   # 8 images
    pruned = [c for c, h in zip(children, histories) if len(h) < 3]
    assert all("ovss_pruned" in c.data.tags and "miou" not in c.data.metrics for c in pruned)
    full = [c for c, h in zip(children, histories) if len(h) == 3]
    assert all(any(k.startswith("iou/") for k in c.data.metrics) for c in full)
    assert all(c.data.metrics["miou"] == h[-1].value for c, h in zip(children, histories)
               if len(h) == 3)
    # The parent holds the best config, plots and overlays.
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "plots", "overlays", "search_space.yaml"} <= arts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert len(client.list_artifacts(parent.info.run_id, "overlays")) == 3
    best_score = parent.data.metrics["best_score"]
    assert best_score == pytest.approx(max(c.data.metrics["miou"] for c in full))
    assert "best mIoU " in out

    # Export, refuse to overwrite, then force.
    tuned = workdir / "tuned.yaml"
    assert export_main(["--method", "toy", "--tracking-uri", uri, "--out", str(tuned)]) == 0
    cfg = yaml.safe_load(tuned.read_text())
    assert cfg["method"] == "toy" and cfg["dataset"] == "voc21"
    assert cfg["provenance"]["parent_run_id"] == parent.info.run_id
    assert cfg["metric"]["value"] == pytest.approx(best_score)
    assert set(cfg["params"]) == {"temp", "thr", "mode", "pool"}
    before = tuned.read_text()
    assert export_main(["--method", "toy", "--tracking-uri", uri, "--out", str(tuned)]) == 2
    assert tuned.read_text() == before
    assert export_main(["--method", "toy", "--tracking-uri", uri, "--out", str(tuned),
                        "--force"]) == 0

    # Inference from the export writes a label map of the image's size.
    from PIL import Image

    img = voc_root / "JPEGImages"
    image = sorted(img.iterdir())[0]
    out_png = workdir / "pred.png"
    assert infer_main(["--config", str(tuned), "--image", str(image), "--classes",
                       "cat,dog", "--out", str(out_png)]) == 0
    pred = np.array(Image.open(out_png))
    assert pred.shape == Image.open(image).size[::-1]
    assert pred.max() <= 2
    assert (workdir / "pred_overlay.png").is_file()

    # A second identical search finds every image cached: no extraction.
    from tests import toy_method

    calls = toy_method.CALLS["extract"]
    assert _search(workdir, voc_root) == 0
    exp_runs = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'",
                                  order_by=["attributes.start_time DESC"])
    assert exp_runs[0].data.tags["ovss_extracted_images"] == "0"
    assert toy_method.CALLS["extract"] == calls  # the driver never extracts itself


def test_load_segmenter_from_python(ray_session, workdir, voc_root):
    import methods

    cfg = {"method": "toy", "backbone": {"name": "tiny"}, "settings": {"seed": 0},
           "params": {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1},
           "classes": {"background": True}}
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seg = methods.load_segmenter(path)
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255
    pred = seg(image, ["cat", "dog"])
    assert pred.shape == (20, 30) and pred.dtype == np.int64
    assert set(np.unique(pred)) <= {0, 1, 2}


def test_cli_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "search.run", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ["--method", "--backbone", "--dataset", "--data-root", "--reward",
                 "--num-samples", "--max-concurrent", "--gpus-per-trial", "--address",
                 "--tracking-uri", "--preset", "--resume", "--set"]:
        assert flag in out


def _read_so_far(proc) -> str:
    """Non-blocking read of what the child wrote to stderr (its tables exist once it prints)."""
    import os
    import select

    chunks = []
    while select.select([proc.stderr], [], [], 0)[0]:
        data = os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
        if not data:
            break
        chunks.append(data)
    proc.seen = getattr(proc, "seen", "") + "".join(chunks)
    return proc.seen


@pytest.mark.ready_store
def test_ctrl_c_leaves_no_run_running(workdir, voc_root):
    import os
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "search.run", "--method", "toy", "--dataset", "voc21",
         "--data-root", str(voc_root), "--num-samples", "500", "--rungs", "1",
         "--max-concurrent", "1"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ})
    db = workdir / "mlflow.db"
    deadline = time.time() + 120
    client = None
    while time.time() < deadline:   # wait until trials are being logged
        time.sleep(0.5)
        if db.exists() and "extract" in _read_so_far(proc):
            client = client or MlflowClient(f"sqlite:///{db}")
            exps = [e.experiment_id for e in client.search_experiments()]
            if exps and len(client.search_runs(exps, "tags.ovss_role = 'trial'")) >= 2:
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = proc.seen + err
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    assert [p.info.status for p in parent] == ["KILLED"]
