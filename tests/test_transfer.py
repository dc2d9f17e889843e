"""search.transfer: a config tuned on a VOC-layout set tested on an ADE-layout set (and back),
cells checked against a direct count with the test data set's own classes."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from search.transfer import main as transfer_main
from tests.test_evaluate import PAPER, TUNED, direct_scores, tuned_config

ADE_TUNED = {"temp": 0.2, "thr": 0.4, "mode": "linear", "pool": 2}


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    from search.data.synthetic import make_dataset

    return make_dataset("ade20k", tmp_path_factory.mktemp("ade"), n=4, seed=0)


@pytest.mark.ready_store
def test_voc_config_tested_on_ade(ray_session, workdir, voc_root, ade_root, capsys):
    a = tuned_config(workdir / "a.yaml")
    b = tuned_config(workdir / "b.yaml", ADE_TUNED, dataset="ade20k")
    rc = transfer_main(["--config", str(a), "--config", str(b), "--dataset", f"voc21={voc_root}",
                        "--dataset", f"ade20k={ade_root}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    print(out)
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0] == "|  | voc21 | ade20k | warm start |"
    rows = {ln.split("|")[1].strip(): [float(x) for x in ln.split("|")[2:4]] for ln in lines[1:]}
    # Each tuned row names the --warm-start flag of the search it came from (its provenance);
    # the paper-defaults row has none.
    warm = {ln.split("|")[1].strip(): ln.split("|")[4].strip() for ln in lines[1:]}
    assert warm == {"tuned on voc21 (toy/tiny)": "--warm-start abc123",
                    "tuned on ade20k (toy/tiny)": "--warm-start abc123",
                    "paper defaults (toy/tiny)": ""}
    assert list(rows) == ["tuned on voc21 (toy/tiny)", "tuned on ade20k (toy/tiny)",
                          "paper defaults (toy/tiny)"]
    for label, params in [("tuned on voc21 (toy/tiny)", TUNED),
                          ("tuned on ade20k (toy/tiny)", ADE_TUNED),
                          ("paper defaults (toy/tiny)", PAPER)]:
        want = [100 * direct_scores(voc_root, params)[0],
                100 * direct_scores(ade_root, params, dataset="ade20k")[0]]
        assert rows[label] == pytest.approx(want, abs=0.006), label
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("transfer")
    run = client.search_runs([exp.experiment_id], "tags.ovss_role = 'transfer'")[0]
    assert run.info.status == "FINISHED"
    arts = {x.path for x in client.list_artifacts(run.info.run_id)}
    assert arts == {"transfer_table.csv", "transfer_table.md", "transfer_heatmap.png"}
    m = run.data.metrics
    key = next(k for k in m if k.startswith("miou/tuned on voc21") and k.endswith("/ade20k"))
    assert m[key] == pytest.approx(
        direct_scores(ade_root, TUNED, dataset="ade20k")[0])


def test_transfer_bad_dataset_one_line(ray_session, workdir, voc_root, capsys):
    a = tuned_config(workdir / "a.yaml")
    assert transfer_main(["--config", str(a), "--dataset", f"voc99={voc_root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown data set 'voc99'")
    assert transfer_main(["--config", str(a), "--dataset", "voc21"]) == 2
    assert "expected NAME=ROOT" in capsys.readouterr().err
    assert not (workdir / "mlflow.db").exists()
