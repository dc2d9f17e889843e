"""mIoU: the confusion matrix against a per-pixel, per-class transcription of the definition,
the reward accumulator, and the ``python -m rewards.miou`` CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from methods.base import OvssError
from rewards.miou import ConfusionMatrix, MiouAccumulator

REPO = Path(__file__).resolve().parent.parent


def reference_iou(preds, gts, num_classes, ignore=255):
    """IoU_c = sum over images of |P=c & G=c| / |P=c | G=c|, on pixels where G != ignore."""
    ious, correct, counted = [], 0, 0
    for c in range(num_classes):
        inter = union = 0
        for p, g in zip(preds, gts):
            for pv, gv in zip(p.ravel().tolist(), g.ravel().tolist()):
                if gv == ignore:
                    continue
                inter += pv == c and gv == c
                union += pv == c or gv == c
        ious.append(inter / union if union else math.nan)
    for p, g in zip(preds, gts):
        for pv, gv in zip(p.ravel().tolist(), g.ravel().tolist()):
            if gv != ignore:
                counted += 1
                correct += pv == gv
    return ious, correct / counted


def random_maps(seed, n_images=4, used=5, num_classes=7):
    """Maps over classes 0..used-1 only (the rest absent from both), with ignore pixels;
    class used-1 appears only in predictions (IoU 0)."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        shape = (int(rng.integers(5, 12)), int(rng.integers(5, 12)))
        g = rng.integers(0, used - 1, shape)
        g[rng.random(shape) < 0.2] = 255
        p = np.where(rng.random(shape) < 0.6, g, rng.integers(0, used, shape))
        p[p == 255] = 0
        preds.append(p.astype(np.int64))
        gts.append(g.astype(np.int64))
    return preds, gts, num_classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_the_definition(seed):
    preds, gts, n = random_maps(seed)
    cm = ConfusionMatrix(n)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    ref, ref_aacc = reference_iou(preds, gts, n)
    iou = cm.iou()
    assert np.isnan(iou[5]) and np.isnan(iou[6])          # absent from both -> NaN
    assert iou[4] == 0.0                                   # predicted only -> 0
    np.testing.assert_allclose(iou, ref, equal_nan=True)
    assert cm.miou() == pytest.approx(np.nanmean(ref))
    assert cm.aacc() == pytest.approx(ref_aacc)
    # the mIoU of summed counts is not the mean of per-image mIoUs
    per_image = [ConfusionMatrix(n).update(p, g).miou() for p, g in zip(preds, gts)]
    assert cm.miou() != pytest.approx(float(np.mean(per_image)))


def test_torch_input_and_merge_equal_one_matrix():
    preds, gts, n = random_maps(3)
    whole = ConfusionMatrix(n)
    for p, g in zip(preds, gts):
        whole.update(p, g)
    a, b = ConfusionMatrix(n), ConfusionMatrix(n)
    for k, (p, g) in enumerate(zip(preds, gts)):
        (a if k % 2 else b).update(torch.from_numpy(p), torch.from_numpy(g).to(torch.uint8))
    np.testing.assert_array_equal(a.merge(b).mat, whole.mat)
    with pytest.raises(OvssError, match="merge"):
        a.merge(ConfusionMatrix(n + 1))


def test_bad_values_raise():
    cm = ConfusionMatrix(3)
    g = np.zeros((4, 4), np.int64)
    with pytest.raises(OvssError, match=r"prediction has values \[3\]"):
        cm.update(np.full((4, 4), 3), g)
    with pytest.raises(OvssError, match="prediction"):
        cm.update(np.full((4, 4), -1), g)
    with pytest.raises(OvssError, match=r"label map has values \[7\]"):
        cm.update(g, np.full((4, 4), 7))
    with pytest.raises(OvssError, match="shape"):
        cm.update(np.zeros((4, 5), np.int64), g)
    assert cm.mat.sum() == 0


def test_to_dict_names_classes_and_nulls_nan():
    cm = ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 0]]))
    d = cm.to_dict(["a", "b", "c"])
    assert d["per_class_iou"] == {"a": 0.5, "b": 0.0, "c": None}
    assert d["miou"] == pytest.approx(0.25) and d["aacc"] == pytest.approx(0.5)
    json.dumps(d)


def test_accumulator():
    acc = MiouAccumulator(3, 255)
    assert acc.value() == 0.0                          # nothing counted yet: all NaN
    with pytest.raises(OvssError, match="label"):
        acc.update(None, np.zeros((2, 2), np.int64), label=None)
    acc.update(None, np.zeros((2, 2), np.int64), label=np.full((2, 2), 255))
    assert acc.value() == 0.0                          # only ignore pixels
    acc.class_names = ["bg", "cat", "dog"]
    acc.update(None, np.array([[1, 1], [0, 2]]), label=np.array([[1, 0], [0, 255]]))
    # dog is predicted only on an ignored pixel: NaN, left out of the mean
    assert acc.value() == pytest.approx((0.5 + 0.5) / 2)
    d = acc.details()
    assert set(d) == {"iou/bg", "iou/cat", "iou/dog", "aacc"}
    assert math.isnan(d["iou/dog"])
    assert d["iou/cat"] == pytest.approx(0.5) and d["aacc"] == pytest.approx(2 / 3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rewards.miou", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def _save(d: Path, name: str, a: np.ndarray) -> None:
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(d / f"{name}.png")


def test_cli(tmp_path):
    preds, gts, n = random_maps(4, n_images=3)
    for k, (p, g) in enumerate(zip(preds, gts)):
        _save(tmp_path / "pred", f"im{k}", p)
        _save(tmp_path / "gt", f"im{k}", g)
    proc = _cli("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--num-classes", n)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ref_aacc = reference_iou(preds, gts, n)
    assert out["miou"] == pytest.approx(np.nanmean(ref))
    assert out["aacc"] == pytest.approx(ref_aacc)
    assert [None if math.isnan(r) else pytest.approx(r) for r in ref] == out["per_class_iou"]

    # --reduce-zero-label: gt 0 -> ignore, i -> i-1
    proc = _cli("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--num-classes", n,
                "--reduce-zero-label")
    reduced = [np.where((g == 0) | (g == 255), 255, g - 1) for g in gts]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["miou"] == pytest.approx(
        np.nanmean(reference_iou(preds, reduced, n)[0]))


@pytest.mark.parametrize("problem", ["no_dir", "missing_pair", "size"])
def test_cli_errors(tmp_path, problem):
    _save(tmp_path / "gt", "a", np.zeros((6, 6)))
    _save(tmp_path / "pred", "a", np.zeros((6, 6) if problem != "size" else (6, 7)))
    if problem == "missing_pair":
        _save(tmp_path / "gt", "b", np.zeros((6, 6)))
    pred = tmp_path / ("nowhere" if problem == "no_dir" else "pred")
    proc = _cli("--pred", pred, "--gt", tmp_path / "gt", "--num-classes", 3)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert {"no_dir": "nowhere", "missing_pair": "b", "size": "a.png"}[problem] in proc.stderr
