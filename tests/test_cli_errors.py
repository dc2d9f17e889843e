"""Bad input: a one-line error naming the thing, exit code 2, no traceback, no MLflow run left
RUNNING. The CLIs run in-process (session Ray) except where a subprocess checks the traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from methods.infer import main as infer_main
from search.run import main as run_main


def _no_running_runs(workdir):
    db = workdir / "mlflow.db"
    if not db.exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(exps, "attributes.status = 'RUNNING'") if exps else []
    assert not running


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err)
    return lines[0]


@pytest.fixture
def broken_voc(tmp_path, voc_root):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    return root


def _toy(root, *extra):
    return ["--method", "toy", "--dataset", "voc21", "--data-root", str(root),
            "--num-samples", "2", *extra]


def test_missing_data_root(workdir, capsys):
    assert run_main(_toy(workdir / "nowhere")) == 2
    assert "nowhere" in _err(capsys)
    _no_running_runs(workdir)


def test_unknown_dataset(workdir, voc_root, capsys):
    assert run_main(["--method", "toy", "--dataset", "pascal99", "--data-root",
                     str(voc_root)]) == 2
    assert "pascal99" in _err(capsys)


def test_unknown_backbone(workdir, voc_root, capsys):
    assert run_main(_toy(voc_root, "--backbone", "vit-z")) == 2
    assert "vit-z" in _err(capsys)


def test_space_low_above_high(workdir, voc_root, capsys):
    assert run_main(_toy(voc_root, "--set", "space.temp.low=5")) == 2
    assert "low 5.0 is above high 1.0" in _err(capsys)


def test_unknown_set_key(workdir, voc_root, capsys):
    assert run_main(_toy(voc_root, "--set", "tua=6")) == 2
    assert "'tua'" in _err(capsys)


def test_unreadable_image(workdir, broken_voc, capsys):
    victim = sorted((broken_voc / "JPEGImages").iterdir())[1]
    victim.write_bytes(b"not a jpeg at all")
    assert run_main(_toy(broken_voc)) == 2
    assert victim.name in _err(capsys)
    _no_running_runs(workdir)


def test_label_map_of_wrong_size(workdir, broken_voc, capsys):
    victim = sorted((broken_voc / "SegmentationClass").iterdir())[0]
    lab = Image.open(victim)
    lab.resize((lab.width + 7, lab.height)).save(victim)
    assert run_main(_toy(broken_voc)) == 2
    msg = _err(capsys)
    assert victim.stem in msg and "size" in msg
    _no_running_runs(workdir)


def test_gpu_asked_where_cluster_has_none(ray_session, workdir, voc_root, capsys):
    assert run_main(_toy(voc_root, "--gpus-per-trial", "0.5")) == 2
    assert "GPU" in _err(capsys)
    _no_running_runs(workdir)


def _toy_config(workdir):
    cfg = workdir / "c.yaml"
    cfg.write_text("method: toy\nbackbone: {name: tiny}\nsettings: {}\n"
                   "params: {temp: 0.1, thr: 0.3, mode: linear, pool: 1}\n")
    return cfg


def test_infer_empty_class_list(workdir, voc_root, capsys):
    image = sorted((voc_root / "JPEGImages").iterdir())[0]
    cfg = _toy_config(workdir)
    assert infer_main(["--config", str(cfg), "--image", str(image), "--classes", " , ",
                       "--out", str(workdir / "o.png")]) == 2
    assert "class" in _err(capsys)
    assert not (workdir / "o.png").exists()


def test_infer_unreadable_image(workdir, capsys):
    bad = workdir / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    cfg = _toy_config(workdir)
    assert infer_main(["--config", str(cfg), "--image", str(bad), "--classes", "cat",
                       "--out", str(workdir / "o.png")]) == 2
    assert "bad.png" in _err(capsys)
    assert not (workdir / "o.png").exists()


def test_folder_dataset_with_empty_class_list(workdir, capsys):
    d = workdir / "mine"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "masks" / "a.png")
    (d / "classes.txt").write_text("\n")
    assert run_main(["--method", "toy", "--dataset", "folder", "--data-root", str(d)]) == 2
    assert "class" in _err(capsys)


def test_subprocess_error_has_no_traceback(workdir):
    proc = subprocess.run([sys.executable, "-m", "search.run", "--method", "toy", "--dataset",
                           "voc21", "--data-root", str(workdir / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
