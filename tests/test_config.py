"""Method specs: validation errors are one line naming the thing; --set semantics."""

from __future__ import annotations

import pytest
import yaml

from methods.base import OvssError
from methods.spec import conf_dirs, load_method_spec
from search.core import config as cfg
from search.core.space import full_params, optuna_space, trial0


def test_toy_spec_resolves_with_backbone_defaults():
    spec = load_method_spec("toy")
    r = cfg.resolve(spec, "other")
    assert r.defaults["temp"] == 0.2            # per-backbone default wins
    assert trial0(r.defaults, r.space)["temp"] == 0.2
    assert set(optuna_space(r.space)) == {"temp", "thr", "mode", "pool"}


def test_set_fixes_knob_and_edits_space():
    spec = load_method_spec("toy")
    r = cfg.resolve(spec, None, None, cfg.parse_set(["temp=0.5", "space.pool.high=1",
                                                     "settings.seed=3", "backbone.path=/x"]))
    assert "temp" not in r.space and r.defaults["temp"] == 0.5
    assert r.space["pool"].high == 1
    assert r.settings["seed"] == 3 and r.backbone["path"] == "/x"
    assert full_params(r.defaults, {"pool": 0})["pool"] == 0


@pytest.mark.parametrize("item, needle", [
    ("nope=1", "unknown --set key 'nope'"),
    ("space.temp.bogus=1", "no field 'bogus'"),
    ("space.thr.low=0.99", "low 0.99 is above high 0.95"),
    ("settings.unknown=1", "unknown --set key 'settings.unknown'"),
    ("temp", "expected key=value"),
])
def test_bad_set_is_one_line_error(item, needle):
    spec = load_method_spec("toy")
    with pytest.raises(OvssError) as e:
        cfg.resolve(spec, None, None, cfg.parse_set([item]))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_narrowed_space_moves_trial0_inside():
    r = cfg.resolve(load_method_spec("toy"), None, None,
                    cfg.parse_set(["space.thr.low=0.5", "space.mode.choices=[square]"]))
    assert r.defaults["thr"] == 0.5 and r.defaults["mode"] == "square"


def test_unknown_backbone_names_choices():
    with pytest.raises(OvssError, match="unknown backbone 'vit-z'.*tiny, other"):
        cfg.resolve(load_method_spec("toy"), "vit-z")


def _write_spec(tmp_path, monkeypatch, mutate):
    raw = yaml.safe_load((conf_dirs()[0] / "methods" / "toy.yaml").read_text())
    mutate(raw)
    d = tmp_path / "conf" / "methods"
    d.mkdir(parents=True)
    (d / "toy.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("OVSS_CONF_PATH", str(tmp_path / "conf"))


def test_space_low_above_high_in_yaml(tmp_path, monkeypatch):
    _write_spec(tmp_path, monkeypatch, lambda r: r["space"]["temp"].update(low=2.0, high=1.0))
    with pytest.raises(OvssError) as e:
        load_method_spec("toy")
    msg = str(e.value)
    assert "space.temp" in msg and "low 2.0 is above high 1.0" in msg and "\n" not in msg


def test_default_outside_space(tmp_path, monkeypatch):
    _write_spec(tmp_path, monkeypatch, lambda r: r["defaults"].update(thr=0.99))
    with pytest.raises(OvssError, match="default thr=0.99 .* outside"):
        cfg.resolve(load_method_spec("toy"))


def test_space_knob_without_default(tmp_path, monkeypatch):
    _write_spec(tmp_path, monkeypatch,
                lambda r: r["space"].update(ghost={"type": "int", "low": 0, "high": 1}))
    with pytest.raises(OvssError, match="space.ghost: knob has no entry in defaults"):
        load_method_spec("toy")


def test_shipped_method_specs_are_valid():
    from methods import METHODS
    from methods.base import CONF_DIR

    for m in METHODS:
        if (CONF_DIR / "methods" / f"{m}.yaml").is_file():
            spec = load_method_spec(m)
            for b in spec.backbones:
                r = cfg.resolve(spec, b)
                assert r.space, f"{m}/{b} searches nothing"
            assert "smoke" in spec.presets


def test_sample_value_stays_in_space_on_its_grid():
    import numpy as np

    from methods.spec import CategoricalParam, FloatParam, IntParam
    from search.core.space import sample_value

    rng = np.random.default_rng(0)
    stepped = FloatParam(type="float", low=0.05, high=0.45, step=0.1)
    logf = FloatParam(type="float", low=1e-3, high=1.0, log=True)
    ints = IntParam(type="int", low=2, high=12, step=2)
    cat = CategoricalParam(type="categorical", choices=["a", "b"])
    draws = {name: [sample_value(p, rng) for _ in range(300)]
             for name, p in [("stepped", stepped), ("log", logf), ("int", ints), ("cat", cat)]}
    assert set(draws["stepped"]) == {0.05, 0.15, 0.25, 0.35, 0.45}
    assert all(1e-3 <= v <= 1.0 for v in draws["log"])
    assert np.median(draws["log"]) < 0.1          # log-uniform, not uniform
    assert set(draws["int"]) == {2, 4, 6, 8, 10, 12}
    assert set(draws["cat"]) == {"a", "b"}
