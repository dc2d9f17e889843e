"""What a clipseg search over SC-CLIP and PAMR reaches, decided before Ray starts
(methods/clipseg/reach.py: the variants and SC-CLIP layers extract stores, the knob values no
trial could decode), and a smoke search that samples scclip and PAMR, exports, and infers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from methods.base import OvssError
from methods.clipseg.reach import search_settings


# --- what a search reaches ----------------------------------------------------------------------
def _space(**kw):
    return {k: ({"type": "categorical", "choices": v} if isinstance(v, list) and
                isinstance(v[0], str) else {"type": "int", "low": v[0], "high": v[1]})
            for k, v in kw.items()}


def test_search_settings_fill_variants_and_layers():
    from methods.spec import load_method_spec
    from search.core.config import resolve

    spec = load_method_spec("clipseg")
    r = resolve(spec, backbone="openai-vit-b16", dataset="voc21", preset=spec.presets["scclip"])
    space = {k: p.model_dump(exclude_none=True) for k, p in r.space.items()}
    out = search_settings(r.backbone, r.settings, r.defaults, space)
    assert out["variants"] == ["scclip"]
    assert out["scclip_layers"] == {"pre": [4, 10], "post": [1, 6], "start": [1, 5],
                                    "end": [8, 11]}
    r = resolve(spec, backbone="openai-vit-b16", dataset="voc21")      # the default search
    space = {k: p.model_dump(exclude_none=True) for k, p in r.space.items()}
    out = search_settings(r.backbone, r.settings, r.defaults, space)
    assert "scclip" not in out["variants"] and out["scclip_layers"] is None
    assert len(out["variants"]) == 8


@pytest.mark.parametrize("space,match", [
    (_space(attention=["scclip"], pre_adjust_idx=(4, 11)), "pre_adjust_idx reaches 4..11"),
    (_space(attention=["scclip"], multi_start_idx=(1, 10)), "every end must exceed"),
    (_space(attention=["cra"], layer=(0, 5)), "layer reaches 0..5"),
    (_space(pamr_steps=(-2, 10)), "pamr_steps reaches -2"),
    ({"pamr_dilations": {"type": "categorical", "choices": ["8,16", ""]}}, "pamr_dilations"),
])
def test_search_settings_refuse_what_no_trial_could_decode(space, match):
    from methods.spec import load_method_spec
    from search.core.config import resolve

    r = resolve(load_method_spec("clipseg"), backbone="openai-vit-b16", dataset="voc21")
    defaults = {**r.defaults, "pamr_steps": 10}
    with pytest.raises(OvssError, match=match):
        search_settings(r.backbone, r.settings, defaults, space)


def test_given_settings_must_hold_the_space():
    from methods.spec import load_method_spec
    from search.core.config import resolve

    r = resolve(load_method_spec("clipseg"), backbone="openai-vit-b16", dataset="voc21")
    space = _space(attention=["scclip", "cra"])
    with pytest.raises(OvssError, match="lacks attention"):
        search_settings(r.backbone, {**r.settings, "variants": ["cra"]}, r.defaults, space)
    small = {"pre": [8, 8], "post": [3, 3], "start": [3, 3], "end": [10, 10]}
    ok = search_settings(r.backbone, {**r.settings, "scclip_layers": small}, r.defaults, space)
    assert ok["scclip_layers"] == small
    with pytest.raises(OvssError, match="scclip_layers.pre"):
        search_settings(r.backbone, {**r.settings, "scclip_layers": small}, r.defaults,
                        {**space, **_space(pre_adjust_idx=(7, 9))})


def test_scclip_protocol_holds_the_official_values():
    from methods.clipseg.protocols import profile

    assert profile("scclip", "voc21")["logit_scale"] == 50.0
    assert profile("scclip", "voc21")["area_threshold"] == 0.1
    assert profile("scclip", "voc21")["prob_threshold"] == 0.15
    assert profile("scclip", "coco_object")["logit_scale"] == 55.0
    assert profile("scclip", "coco_object")["prob_threshold"] == 0.35
    assert profile("scclip", "context60")["prob_threshold"] == 0.15
    assert profile("scclip", "coco_stuff164k")["short_side"] == 336
    assert profile("scclip", "cityscapes")["short_side"] == 560
    assert (profile("scclip", "ade20k")["window"], profile("scclip", "ade20k")["stride"]) == (
        224, 112)
    assert math.isclose(profile("scclip", None)["logit_scale"], 40.0)


# --- a search that samples scclip and PAMR, its export, and inference --------------------------
@pytest.mark.slow
@pytest.mark.ready_store
def test_smoke_search_samples_scclip_and_pamr_exports_and_infers(ray_session, workdir):
    import yaml
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from methods.infer import main as infer_main
    from search.export import main as export_main
    from search.run import main as run_main

    assert run_main(["--method", "clipseg", "--preset", "smoke", "--num-samples", "10",
                     "--set", "space.attention.choices=[scclip, naclip]"]) == 0
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = [e for e in client.search_experiments() if e.name.startswith("clipseg/")][0]
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    assert len(trials) >= 10 and {t.info.status for t in trials} == {"FINISHED"}
    sampled = [(t.data.params["attention"], int(t.data.params["pamr_steps"])) for t in trials]
    assert ("scclip", 0) in sampled                         # trial 0: scclip, PAMR off
    assert any(a == "scclip" and s > 0 for a, s in sampled), sampled
    parent = [r for r in runs if r.data.tags.get("ovss_role") != "trial"][0]
    assert parent.data.params["settings.variants"] == '["naclip", "scclip"]'
    out = workdir / "tuned.yaml"
    assert export_main(["--method", "clipseg", "--tracking-uri", uri, "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["settings"]["variants"] == ["naclip", "scclip"]
    assert cfg["settings"]["scclip_layers"] == {"pre": [1, 2], "post": [0, 2], "start": [0, 1],
                                                "end": [2, 3]}
    assert cfg["defaults"]["attention"] == "scclip"        # trial 0: the paper baseline
    from search.evaluate import main as evaluate_main

    root = workdir / ".ovss" / "smoke" / "voc21"
    assert evaluate_main(["--config", str(out), "--dataset", "voc21", "--data-root", str(root),
                          "--max-images", "2", "--baseline", "paper"]) == 0
    image = sorted((root / "JPEGImages").iterdir())[0]
    forced = {**cfg["params"], "attention": "scclip", "pamr_steps": 5, "pamr_dilations": "4,8"}
    for name, params_ in (("best", cfg["params"]), ("forced", forced)):
        one = workdir / f"tuned-{name}.yaml"
        one.write_text(yaml.safe_dump({**cfg, "params": params_}))
        png = workdir / f"pred-{name}.png"
        assert infer_main(["--config", str(one), "--image", str(image), "--classes",
                           "cat,dog,person", "--out", str(png)]) == 0
        pred = np.array(Image.open(png))
        assert pred.shape == Image.open(image).size[::-1] and pred.max() <= 3


def test_paper_baseline_is_the_searchs_trial_0():
    from search.engine.configs import paper_config

    cfg = {"method": "clipseg", "backbone": {"name": "tiny"}, "backbone_name": "tiny",
           "params": {"attention": "naclip", "pamr_steps": 5},
           "defaults": {"attention": "scclip", "pamr_steps": 0}}
    assert paper_config(cfg)["params"] == {"attention": "scclip", "pamr_steps": 0}


@pytest.mark.parametrize("bad,match", [
    ({"variants": ["scclip", "nope"]}, "unknown variant"),
    ({"variants": "scclip"}, "settings.variants"),
    ({"lof_neighbors": 0}, "lof_neighbors"),
    ({"lof_contamination": 1.5}, "lof_contamination"),
    ({"scclip_layers": {"pre": [0, 9]}}, "scclip_layers must map"),
    ({"scclip_layers": {"pre": [0, 5], "post": [0, 1], "start": [0, 1], "end": [2, 3]}},
     "scclip_layers.pre"),
])
def test_bad_scclip_settings_name_the_setting(bad, match):
    from methods.clipseg import SEGMENTER

    tiny = {"name": "tiny", "tiny": {"width": 64, "layers": 4, "heads": 2, "patch_size": 8,
                                     "image_size": 32}}
    with pytest.raises(OvssError, match=match):
        SEGMENTER.from_spec(tiny, {"variants": ["scclip"], **bad})
