"""`--reward clip`: a search that never reads a dense label, and the fidelity report."""

from __future__ import annotations

import math
import shutil

import pytest
from mlflow.tracking import MlflowClient

from search.run import main as run_main

pytestmark = pytest.mark.slow


def _runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    return parent, trials


@pytest.mark.ready_store
def test_clip_reward_search_reads_no_dense_label(ray_session, workdir, voc_root):
    root = workdir / "voc"
    shutil.copytree(voc_root, root)
    shutil.rmtree(root / "SegmentationClass")       # no dense label exists to be read
    assert (root / "image_labels.json").is_file()
    assert run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(root),
                     "--reward", "clip", "--reward-backbone", "tiny", "--num-samples", "8",
                     "--rungs", "2"]) == 0
    parent, trials = _runs(workdir)
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["ovss_reward"] == "clip"
    assert len(trials) == 8
    assert not any("miou" in t.data.metrics for t in trials)
    assert all("rung/clip_score" in t.data.metrics for t in trials)
    full = [t for t in trials if "ovss_pruned" not in t.data.tags]
    assert full and all(0.0 <= t.data.metrics["clip_score"] <= 1.0 for t in full)
    # The reward's own counts are on every fully scored trial, and agree with its score.
    for t in full:
        m = t.data.metrics
        assert {"clip_wins", "clip_pairs", "clip_images", "clip_unscored_images"} <= set(m)
        assert m["clip_images"] == 8 and 0 <= m["clip_wins"] <= m["clip_pairs"]
        assert m["clip_score"] == pytest.approx(m["clip_wins"] / m["clip_pairs"]
                                                if m["clip_pairs"] else 0.0)
    # A reward that ranks nothing (the same for every trial) is said on the parent run.
    constant = len({t.data.metrics["clip_score"] for t in full}) == 1 and len(full) > 1
    assert ("ovss_reward_constant" in parent[0].data.tags) == constant


def test_dense_labels_are_refused_in_image_label_mode(voc_root):
    from search.data import DenseLabelsForbidden, open_dataset

    data = open_dataset("voc21", voc_root, labels="image")
    assert data.image_labels(0)
    with pytest.raises(DenseLabelsForbidden):
        data.label(0)


@pytest.mark.ready_store
def test_fidelity_report_on_parent_run(ray_session, workdir, voc_root):
    # the toy CLIP (trained on generated scenes): its reward ranks the trials' masks
    assert run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                     "--reward", "clip", "--reward-backbone", "toy-clip", "--fidelity",
                     "--num-samples", "8", "--rungs", "1"]) == 0
    parent, trials = _runs(workdir)
    m = parent[0].data.metrics
    for key in ["fidelity_spearman", "fidelity_kendall", "fidelity_regret_miou"]:
        assert key in m
    # An undefined rank correlation is logged as NaN with the reason beside it, never dropped.
    from rewards.fidelity import undefined_reason

    why = undefined_reason([t.data.metrics["clip_score"] for t in trials],
                           [t.data.metrics["fidelity_miou"] for t in trials],
                           ("the CLIP reward", "mIoU"))
    assert len({t.data.metrics["clip_score"] for t in trials}) > 2   # the reward varies
    for key in ["fidelity_spearman", "fidelity_kendall"]:
        assert math.isnan(m[key]) == (why is not None)
        assert parent[0].data.tags.get(f"ovss_undefined/{key}") == why
    mious = [t.data.metrics["fidelity_miou"] for t in trials]
    assert m["fidelity_regret_miou"] >= 0 and m["fidelity_regret_miou"] <= max(mious)
    assert math.isclose(m["fidelity_best_miou"], max(mious), rel_tol=1e-6)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    plots = {a.path for a in client.list_artifacts(parent[0].info.run_id, "plots")}
    assert "plots/fidelity_scatter.png" in plots
