"""search.run --backbone tiny,other: one search per backbone in one Ray session, each in its own
experiment, then a summary run comparing them."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from search.run import main as run_main

pytestmark = pytest.mark.slow


@pytest.mark.ready_store
def test_two_backbones_one_session(ray_session, workdir, tmp_path_factory, capsys):
    from search.data.synthetic import make_dataset

    root = make_dataset("voc", tmp_path_factory.mktemp("voc20b"), n=20, seed=1)
    rc = run_main(["--method", "toy", "--backbone", "tiny,other", "--dataset", "voc21",
                   "--data-root", str(root), "--num-samples", "3", "--rungs", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-2000:]
    print(cap.out)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parents = {}
    for bb in ("tiny", "other"):
        exp = client.get_experiment_by_name(f"toy/{bb}/voc21")
        runs = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        parents[bb] = runs[0]
        trial0 = client.search_runs([exp.experiment_id], "tags.ovss_trial_number = '0'")[0]
        # Trial 0 is that backbone's paper defaults (other overrides temp to 0.2).
        assert float(trial0.data.params["temp"]) == pytest.approx(0.1 if bb == "tiny" else 0.2)
    exp = client.get_experiment_by_name("toy/all-backbones/voc21")
    summary = client.search_runs([exp.experiment_id], "tags.ovss_role = 'backbones'")
    assert len(summary) == 1 and summary[0].info.status == "FINISHED"
    m = summary[0].data.metrics
    for bb, run in parents.items():
        assert m[f"{bb}/best_score"] == pytest.approx(run.data.metrics["best_score"])
        assert m[f"{bb}/holdout_tuned"] == pytest.approx(run.data.metrics["holdout_miou_best"])
        assert m[f"{bb}/holdout_default"] == pytest.approx(
            run.data.metrics["holdout_miou_default"])
        assert m[f"{bb}/trials"] == 3
    assert summary[0].data.tags["ovss_search_runs"] == ",".join(
        parents[b].info.run_id for b in ("tiny", "other"))
    arts = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert arts == {"backbones.csv", "backbones.md"}
    lines = cap.out.strip().splitlines()
    assert lines[-1].startswith("best backbone: ")
    rows = [ln for ln in lines if ln.startswith("| tiny |") or ln.startswith("| other |")]
    assert len(rows) == 2


def test_unknown_backbone_in_list_refused(workdir, voc_root, capsys):
    rc = run_main(["--method", "toy", "--backbone", "tiny,nosuch", "--dataset", "voc21",
                   "--data-root", str(voc_root)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown backbone 'nosuch' for method toy")
    assert not (workdir / "mlflow.db").exists()


def test_all_means_every_backbone():
    from search.engine.backbones import backbone_names

    assert backbone_names("toy", "all") == ["tiny", "other"]
    assert "tiny" not in backbone_names("clipseg", "all")
