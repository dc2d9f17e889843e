"""search.evaluate end to end on a generated VOC set with the toy method, checked against a
direct per-pixel count of intersections and unions (not through rewards.miou)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.engine.holdout import holdout_count
from search.evaluate import main as evaluate_main

TUNED = {"temp": 0.12, "thr": 0.45, "mode": "square", "pool": 2}
PAPER = {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1}   # tests/conf/methods/toy.yaml


def tuned_config(path, params=TUNED, **extra):
    cfg = {"method": "toy", "backbone_name": "tiny", "backbone": {"name": "tiny"},
           "dataset": "voc21", "settings": {"seed": 0, "fail_flag": ""}, "params": dict(params),
           "classes": {"background": True}, "provenance": {"parent_run_id": "abc123"}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def direct_scores(root, params, dataset="voc21", n=None, ids=None):
    """Slow transcription: segment each image whole, count per class over all images (the first
    ``n``, or those whose id is in ``ids``) |pred=c & gt=c| / |pred=c or gt=c| (gt 255 left
    out), mean over classes with a union."""
    from search.data import open_dataset
    from tests.toy_method import ToySegmenter

    data = open_dataset(dataset, root)
    seg = ToySegmenter({"seed": 0, "fail_flag": ""})
    k = len(data.classes.names)
    inter, union = np.zeros(k), np.zeros(k)
    right = total = 0
    for i in range(len(data) if n is None else n):
        if ids is not None and data.ids()[i] not in ids:
            continue
        gt = data.label(i).astype(np.int64)
        pred = seg.segment(data.image(i), data.classes, params, data.image_labels(i))
        keep = gt != 255
        for c in range(k):
            p, g = (pred == c) & keep, (gt == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
        right += (pred[keep] == gt[keep]).sum()
        total += keep.sum()
    ious = [inter[c] / union[c] for c in range(k) if union[c] > 0]
    per = {data.classes.names[c]: (inter[c] / union[c] if union[c] else math.nan)
           for c in range(k)}
    return sum(ious) / len(ious), right / total, per


@pytest.mark.ready_store
def test_evaluate_with_paper_baseline(ray_session, workdir, voc_root, capsys):
    cfg = tuned_config(workdir / "tuned.yaml")
    rc = evaluate_main(["--config", str(cfg), "--dataset", "voc21", "--data-root", str(voc_root),
                        "--baseline", "paper"])
    out = capsys.readouterr().out
    assert rc == 0, out
    t_miou, t_aacc, t_per = direct_scores(voc_root, TUNED)
    p_miou, p_aacc, p_per = direct_scores(voc_root, PAPER)
    assert abs(t_miou - p_miou) > 1e-3, "the test needs configs that score differently"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    runs = client.search_runs([exp.experiment_id], "tags.ovss_role = 'evaluation'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ovss_search_run"] == "abc123"
    m = run.data.metrics
    assert m["miou"] == pytest.approx(t_miou) and m["aacc"] == pytest.approx(t_aacc)
    assert m["paper_miou"] == pytest.approx(p_miou)
    assert m["gap_miou"] == pytest.approx(t_miou - p_miou)
    for c, v in t_per.items():
        if not math.isnan(v):
            assert m[f"iou/{c}"] == pytest.approx(v)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_table.csv", "eval_table.md", "overlays"} <= arts
    local = client.download_artifacts(run.info.run_id, "eval_table.csv", str(workdir))
    lines = open(local).read().splitlines()
    assert lines[0] == ",tuned,paper default,difference"
    assert lines[1].startswith("mIoU,")
    miou_row = [float(x) for x in lines[1].split(",")[1:]]
    assert miou_row == pytest.approx([t_miou, p_miou, t_miou - p_miou])
    # The printed Markdown table: mIoU in percent, the difference per class too.
    assert "| mIoU | " in out and f"{100 * t_miou:.2f}" in out and f"{100 * p_miou:.2f}" in out
    name = next(c for c in t_per if not math.isnan(t_per[c]) and abs(t_per[c] - p_per[c]) > 1e-3)
    row = next(ln for ln in out.splitlines() if ln.startswith(f"| {name} |"))
    diff = float(row.split("|")[4])
    assert diff == pytest.approx(100 * (t_per[name] - p_per[name]), abs=0.01)
    print(out)


@pytest.mark.ready_store
def test_evaluate_max_images(ray_session, workdir, voc_root, capsys):
    cfg = tuned_config(workdir / "tuned.yaml")
    rc = evaluate_main(["--config", str(cfg), "--dataset", "voc21", "--data-root", str(voc_root),
                        "--max-images", "3"])
    assert rc == 0
    t_miou, _, _ = direct_scores(voc_root, TUNED, n=3)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("toy/tiny/voc21").experiment_id],
                             "tags.ovss_role = 'evaluation'")[0]
    assert run.data.metrics["miou"] == pytest.approx(t_miou)
    assert run.data.metrics["images"] == 3


@pytest.mark.parametrize("case", ["missing_knob", "unknown_dataset", "no_run", "bad_split"])
def test_bad_input_one_line_and_no_run(ray_session, workdir, voc_root, capsys, case):
    cfg = tuned_config(workdir / "tuned.yaml")
    argv = ["--config", str(cfg), "--dataset", "voc21", "--data-root", str(voc_root)]
    if case == "missing_knob":
        params = {k: v for k, v in TUNED.items() if k != "thr"}
        argv[1] = str(tuned_config(workdir / "bad.yaml", params))
        want = "lacks knob(s) thr"
    elif case == "unknown_dataset":
        argv[3] = "nosuchset"
        want = "unknown data set 'nosuchset'"
    elif case == "no_run":
        argv[:2] = ["--run", "0123456789abcdef"]
        want = "no MLflow run '0123456789abcdef'"
    else:
        argv += ["--split", "nosplit"]
        want = "no split 'nosplit'"
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and want in err[-1], err
    db = workdir / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        exps = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(exps, "tags.ovss_role = 'evaluation'")


def test_holdout_count():
    assert holdout_count(19, None) == 0
    assert holdout_count(20, None) == 4
    assert holdout_count(101, None) == 20
    assert holdout_count(8, 3) == 3
    from methods.base import OvssError

    with pytest.raises(OvssError, match="only 8 image"):
        holdout_count(8, 8)
    with pytest.raises(OvssError, match="negative"):
        holdout_count(8, -1)


@pytest.mark.slow
@pytest.mark.ready_store
def test_real_method_smoke_clipseg_tiny(ray_session, workdir, voc_root, capsys):
    """The real CLIP CRA+DSI method (tiny random-weight backbone): evaluate --baseline paper
    agrees with whole-image segment() calls counted directly."""
    from methods import get_segmenter_class
    from methods.spec import load_method_spec
    from search.core.config import resolve
    from search.data import open_dataset

    spec = load_method_spec("clipseg")
    r = resolve(spec, "tiny", "voc21", None, spec.presets["smoke"])
    tuned = {**r.defaults, "layer": 3, "bg_threshold": 0.3}
    cfg = {"method": "clipseg", "backbone_name": "tiny", "backbone": r.backbone,
           "dataset": "voc21", "settings": r.settings, "params": tuned}
    path = workdir / "clipseg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert evaluate_main(["--config", str(path), "--dataset", "voc21", "--data-root",
                          str(voc_root), "--max-images", "3", "--baseline", "paper"]) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("clipseg/tiny/voc21").experiment_id],
                             "tags.ovss_role = 'evaluation'")[0]
    data = open_dataset("voc21", voc_root)
    seg = get_segmenter_class("clipseg").from_spec(r.backbone, r.settings, "cpu")
    for key, params in [("miou", tuned), ("paper_miou", r.defaults)]:
        k = len(data.classes.names)
        inter, union = np.zeros(k), np.zeros(k)
        for i in range(3):
            gt = data.label(i).astype(np.int64)
            pred = np.asarray(seg.segment(data.image(i), data.classes, params,
                                          data.image_labels(i)))
            keep = gt != 255
            for c in range(k):
                p, g = (pred == c) & keep, (gt == c) & keep
                inter[c] += (p & g).sum()
                union[c] += (p | g).sum()
        want = np.mean([inter[c] / union[c] for c in range(k) if union[c] > 0])
        assert run.data.metrics[key] == pytest.approx(want, abs=1e-6), key
