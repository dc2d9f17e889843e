"""Where a search's present classes come from is one explicit setting: by default the method's
own (extract gets None, as at inference); image labels or ground truth only when asked for by
name, tagged on the runs, carried into the export, and said at inference."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from methods.base import ClassSet
from methods.infer import presence_for_inference
from search.run import main as run_main


def _extract_presents(workdir) -> list:
    """The ``present`` each cached base evidence entry of the toy method was extracted with."""
    out = []
    for f in (workdir / ".ovss" / "cache" / "toy").rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            if "affinity" in h.keys():                # base entries (not the pool extension)
                out.append(json.loads(h.metadata()["ovss_meta"]).get("present", "missing"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["model", "ground_truth"])
@pytest.mark.ready_store
def test_presence_source_decides_what_extract_gets(ray_session, workdir, voc_root, source):
    argv = ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
            "--num-samples", "3", "--rungs", "1"]
    if source != "model":
        argv += ["--set", f"settings.presence_source={source}"]
    assert run_main(argv) == 0
    presents = _extract_presents(workdir)
    assert len(presents) == 8
    if source == "model":
        assert presents == [None] * 8                 # no oracle enters a default search
    else:
        assert all(isinstance(p, list) for p in presents) and any(presents)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["ovss_presence_source"] for r in runs} == {source}
    parent = [r for r in runs if r.data.tags["ovss_role"] == "search"][0]
    local = client.download_artifacts(parent.info.run_id, "best_config.yaml", str(workdir))
    exported = yaml.safe_load(open(local))
    assert exported["settings"]["presence_source"] == source


def test_presence_source_is_checked_before_ray(workdir, voc_root, capsys, monkeypatch):
    import search.engine.session as session

    monkeypatch.setattr(session, "init_ray", lambda a: (_ for _ in ()).throw(AssertionError))
    base = ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root)]
    assert run_main([*base, "--set", "settings.presence_source=oracle"]) == 2
    assert "presence_source 'oracle'" in capsys.readouterr().err
    assert run_main([*base, "--reward", "clip", "--set",
                     "settings.presence_source=ground_truth"]) == 2
    assert "ground_truth reads the dense label maps" in capsys.readouterr().err


def test_inference_uses_the_exported_source_and_says_when_told_otherwise(capsys):
    cs = ClassSet.from_names(["cat", "dog", "cow"], background=True)
    model = {"settings": {"presence_source": "model"}}
    oracle = {"settings": {"presence_source": "ground_truth"}}
    assert presence_for_inference(model, cs, None) is None
    assert capsys.readouterr().err == ""
    assert presence_for_inference(model, cs, "dog, cat") == [1, 2]
    assert "instead of the method's own" in capsys.readouterr().err
    assert presence_for_inference(oracle, cs, None) is None
    assert "tuned with presence_source=ground_truth" in capsys.readouterr().err
    assert presence_for_inference(oracle, cs, "cow") == [3]
    from methods.base import OvssError

    with pytest.raises(OvssError, match="not in it: horse"):
        presence_for_inference(model, cs, "horse")
