"""`--preset smoke` of every shipped method: a real search on the tiny backbone (clipseg: the toy
CLIP trained on generated scenes) logs to MLflow, exports, and the export runs inference that
writes a mask; clipseg's tuned config beats the paper defaults on held-out scenes."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from bench.toy_clip import heldout_root
from methods import METHODS
from methods.infer import main as infer_main
from search.evaluate import main as evaluate_main
from search.export import main as export_main
from search.run import main as run_main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.ready_store
def test_smoke_search_exports_and_infers(method, ray_session, workdir, capsys):
    # clipseg's is then scored on held-out scenes: a search whose best config does not depend on
    # the order trials finish (random sampler: the i-th trial depends on the seed only; one rung:
    # no trial pruned by another's result). With TPE + ASHA, 8 trials on 8 scenes sometimes
    # pick a config that wins on those 8 and loses on others (seen in CI: 26.7 % tuned, 12.0 %
    # held out against the defaults' 14.5 %).
    extra = ["--sampler", "random", "--rungs", "1", "--seed", "0"] if method == "clipseg" else []
    assert run_main(["--method", method, "--preset", "smoke", *extra]) == 0
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exps = [e for e in client.search_experiments() if e.name.startswith(f"{method}/")]
    assert len(exps) == 1 and exps[0].name.endswith("/voc21")
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(trials) >= 8 and {t.info.status for t in trials} == {"FINISHED"}
    assert all("rung/miou" in t.data.metrics for t in trials)   # every trial scored
    full = [t for t in trials if "ovss_pruned" not in t.data.tags]
    assert full and all("miou" in t.data.metrics for t in full)     # headline: every image
    out = workdir / "tuned.yaml"
    assert export_main(["--method", method, "--tracking-uri", uri, "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["method"] == method
    image = sorted((workdir / ".ovss" / "smoke" / "voc21" / "JPEGImages").iterdir())[0]
    pred_png = workdir / "pred.png"
    assert infer_main(["--config", str(out), "--image", str(image), "--classes",
                       "cat,dog,person", "--out", str(pred_png)]) == 0
    pred = np.array(Image.open(pred_png))
    assert pred.shape == Image.open(image).size[::-1] and pred.max() <= 3
    if method == "clipseg":
        beats_defaults_on_held_out_scenes(out, uri, workdir)


def beats_defaults_on_held_out_scenes(config, uri, workdir):
    """The toy CLIP's tuned config against the paper defaults (trial 0), on 24 scenes of a
    generator seed no search saw."""
    held = heldout_root("voc21", 24, workdir / "heldout")
    assert evaluate_main(["--config", str(config), "--dataset", "voc21", "--data-root",
                          str(held), "--baseline", "paper", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clipseg/toy-clip/voc21")
    run = client.search_runs([exp.experiment_id], "tags.ovss_role = 'evaluation'")[0]
    m = run.data.metrics
    assert m["miou"] > m["paper_miou"] + 0.01, m
