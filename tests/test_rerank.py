"""Two-stage search (search/engine/rerank.py): the agreement report against a hand computation, the
choice of trials, the config errors, and whole searches whose winner and logged numbers are
checked against a straight full-pipeline computation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from methods.base import OvssError
from search.engine.rerank import pick_winner, rerank_report, top_rows
from search.run import main as run_main

REPO = Path(__file__).resolve().parent.parent


def hand_spearman(x, y):
    """Spearman's rho without ties: 1 - 6 sum d^2 / (n (n^2 - 1))."""
    rx = {i: r for r, i in enumerate(sorted(range(len(x)), key=lambda i: x[i]))}
    ry = {i: r for r, i in enumerate(sorted(range(len(y)), key=lambda i: y[i]))}
    n = len(x)
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def hand_kendall(x, y):
    """Kendall's tau without ties: (concordant - discordant) / (n (n - 1) / 2)."""
    n, s = len(x), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if (x[i] - x[j]) * (y[i] - y[j]) > 0 else -1
    return s / (n * (n - 1) / 2)


def test_report_against_a_hand_computation():
    proxy = [0.9, 0.8, 0.7, 0.6, 0.5]
    full = [0.50, 0.72, 0.61, 0.40, 0.55]
    rep = rerank_report(proxy, full)
    assert rep["rerank_spearman"] == pytest.approx(hand_spearman(proxy, full))
    assert rep["rerank_kendall"] == pytest.approx(hand_kendall(proxy, full))
    assert rep["rerank_regret"] == pytest.approx(0.72 - 0.50)     # best full - proxy pick's
    assert rep["rerank_trials"] == 5
    assert pick_winner([{"score": f} for f in full]) == 1
    assert pick_winner([{"score": 0.3}, {"score": 0.7}, {"score": 0.7}]) == 1   # earliest
    two = rerank_report([0.9, 0.8], [0.1, 0.2])
    assert math.isnan(two["rerank_spearman"]) and two["rerank_regret"] == pytest.approx(0.1)


def test_top_rows_takes_the_survivors_best_first():
    rows = [{"score": 0.9, "images": 2, "trial_id": "a"},      # pruned early: not eligible
            {"score": 0.5, "images": 8, "trial_id": "b"},
            {"score": 0.7, "images": 8, "trial_id": "c"},
            {"score": 0.5, "images": 8, "trial_id": "d"},
            {"score": 0.1, "images": 8, "trial_id": "e"}]
    assert [r["trial_id"] for r in top_rows(rows, 3)] == ["c", "b", "d"]
    assert [r["trial_id"] for r in top_rows(rows, 10)] == ["c", "b", "d", "e"]
    with pytest.raises(OvssError, match="no trial"):
        top_rows([], 2)


TOY = {
    "method": "toy", "default_backbone": "tiny", "backbones": {"tiny": {}},
    "settings": {"seed": 0, "fail_flag": ""},
    # pool (the knob-dependent extraction) is not searched: 2 in the full pipeline, 0 in the
    # proxy, so proxy and full scores differ.
    "defaults": {"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 2},
    "space": {"temp": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
              "thr": {"type": "float", "low": 0.05, "high": 0.95, "step": 0.05},
              "mode": {"type": "categorical", "choices": ["linear", "square"]}},
    "proxy": {"set": {"pool": 0}},
}


@pytest.fixture
def toy_conf(tmp_path, monkeypatch):
    """A toy method YAML with a proxy, looked up before tests/conf."""
    def write(spec):
        d = tmp_path / "conf" / "methods"
        d.mkdir(parents=True, exist_ok=True)
        (d / "toy.yaml").write_text(yaml.safe_dump(spec))
        monkeypatch.setenv("OVSS_CONF_PATH", os.pathsep.join(
            [str(tmp_path / "conf"), str(REPO / "tests" / "conf")]))
    return write


def test_proxy_errors_are_one_line_and_come_before_ray(toy_conf, voc_root, capsys):
    from methods.spec import load_method_spec
    from search.core.config import resolve, resolve_proxy

    toy_conf({**TOY, "proxy": {"settings": {"nope": 1}}})
    with pytest.raises(OvssError, match=r"proxy\.settings\.nope: not a setting"):
        load_method_spec("toy")
    toy_conf({**TOY, "proxy": {"set": {"temp": 0.5}}})
    spec = load_method_spec("toy")
    with pytest.raises(OvssError, match=r"proxy\.set\.temp: the knob is searched"):
        resolve_proxy(spec, resolve(spec))
    toy_conf({**TOY, "proxy": None})
    spec = load_method_spec("toy")
    with pytest.raises(OvssError, match="declares no proxy"):
        resolve_proxy(spec, resolve(spec))
    toy_conf(TOY)
    argv = ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root)]
    assert run_main([*argv, "--rerank-top", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: --rerank-top 0: must be at least 1" in err and len(err.splitlines()) == 1
    assert run_main([*argv, "--preset", "reference"]) == 2
    assert "'reference': method toy has no such preset" in capsys.readouterr().err


def test_reference_preset_plans_the_reference_search(voc_root):
    from search.engine.plan import plan_search
    from search.run import build_parser

    base = ["--method", "pnp", "--backbone", "tiny", "--dataset", "voc21"]
    with pytest.raises(OvssError, match="no data root"):    # no synthetic data for this preset
        plan_search(build_parser().parse_args([*base, "--preset", "reference"]))
    plan = plan_search(build_parser().parse_args([*base, "--preset", "reference",
                                                  "--data-root", str(voc_root)]))
    assert plan.rerank_top == 1
    assert plan.proxy.settings == {"prompt_classes": "all"}
    assert plan.proxy.set == {"drop_iters": 1, "crf": False}
    assert plan.resolved.defaults["drop_iters"] == 4 and plan.resolved.defaults["crf"] is True
    assert plan.resolved.settings["prompt_classes"] == "present"    # inference: ours
    ours = plan_search(build_parser().parse_args([*base, "--data-root", str(voc_root),
                                                  "--rerank-top", "4"]))
    assert ours.rerank_top == 4 and ours.proxy.settings == {}
    one = plan_search(build_parser().parse_args([*base, "--data-root", str(voc_root)]))
    assert one.rerank_top == 0 and one.proxy is None


def straight_full_miou(voc_root, params):
    """The full pipeline (pool 2) of one config on every image, without the search."""
    from rewards.miou import MiouAccumulator
    from search.data import open_dataset
    from tests.toy_method import ToySegmenter

    data = open_dataset("voc21", str(voc_root), "val", labels="dense")
    seg = ToySegmenter({"seed": 0, "fail_flag": ""})
    acc = MiouAccumulator(len(data.classes.names), 255, class_names=list(data.classes.names))
    for i in range(len(data)):
        image = data.image(i)
        ev = seg.extract(image, data.classes, None)
        ev = ev.merged(seg.extend(ev, image, data.classes, None, {"pool": 2}))
        acc.update(None, seg.decode(ev, params), label=data.label(i))
    return acc.value()


@pytest.mark.slow
@pytest.mark.ready_store
def test_rerank_search_exports_the_full_pipeline_winner(ray_session, workdir, voc_root,
                                                        toy_conf, capsys):
    from mlflow.tracking import MlflowClient

    toy_conf(TOY)
    assert run_main(["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
                     "--num-samples", "8", "--rungs", "1", "--seed", "2",
                     "--rerank-top", "4"]) == 0
    out = capsys.readouterr().out
    assert "rerank: top 4 proxy trials" in out and "spearman=" in out
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    parent = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'")[0]
    trials = client.search_runs([exp.experiment_id], "tags.ovss_role = 'trial'")
    assert parent.info.status == "FINISHED" and len(trials) == 8
    m = parent.data.metrics
    assert {"rerank_spearman", "rerank_kendall", "rerank_regret"} <= set(m)
    full = [x.value for x in sorted(client.get_metric_history(parent.info.run_id,
                                                              "rerank_full_score"),
                                    key=lambda x: x.step)]
    proxy = [x.value for x in sorted(client.get_metric_history(parent.info.run_id,
                                                               "rerank_proxy_score"),
                                     key=lambda x: x.step)]
    assert len(full) == 4 and proxy == sorted(proxy, reverse=True)
    # The proxy scores are the 4 best trial scores (pool 0).
    scores = sorted((t.data.metrics["miou"] for t in trials), reverse=True)
    assert proxy == pytest.approx(scores[:4])
    assert m["rerank_regret"] == pytest.approx(max(full) - full[0])
    assert m["best_score"] == pytest.approx(max(full))
    assert parent.data.tags["ovss_rerank_top"] == "4"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "rerank.yaml"} <= arts
    cfg = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "best_config.yaml",
                                                        str(workdir))).read_text())
    assert cfg["params"]["pool"] == 2                     # what inference runs, not the proxy's
    assert cfg["metric"]["value"] == pytest.approx(max(full))
    assert cfg["rerank"]["top"] == 4 and cfg["rerank"]["proxy"]["set"] == {"pool": 0}
    # The logged full score is the straight full pipeline's, and the proxy's differs.
    assert cfg["metric"]["value"] == pytest.approx(straight_full_miou(voc_root, cfg["params"]),
                                                   abs=1e-9)
    assert not np.allclose(proxy, full)


@pytest.mark.slow
@pytest.mark.ready_store
def test_pnp_smoke_rerank_prints_the_correlation(ray_session, workdir, capsys):
    """On the tests' data: the proxy (D = 1) trials, then the full smoke pipeline (D = 2)."""
    assert run_main(["--method", "pnp", "--preset", "smoke", "--num-samples", "6",
                     "--rungs", "1", "--rerank-top", "3"]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    line = next(x for x in out.splitlines() if x.startswith("rerank:"))
    assert "top 3 proxy trials" in line and "spearman=" in line and "kendall=" in line
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pnp/tiny/voc21")
    parent = client.search_runs([exp.experiment_id], "tags.ovss_role = 'search'")[0]
    cfg = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "best_config.yaml",
                                                        str(workdir))).read_text())
    assert cfg["params"]["drop_iters"] == 2 and cfg["params"]["crf"] is False
    # Proxy trials ran at D = 1: no chain entries; the re-ranked ones cached their D = 2 chains.
    table = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "rerank.yaml",
                                                          str(workdir))).read_text())
    cells = {(t["params"]["layer"], t["params"]["head"]) for t in table["trials"]}
    assert table["proxy"]["set"] == {"drop_iters": 1, "crf": False}
    entries = list((workdir / ".ovss" / "cache" / "pnp").rglob("*.safetensors"))
    assert len(entries) == 8 + 8 * len(cells)
