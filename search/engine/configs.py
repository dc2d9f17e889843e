"""Tuned configs to score: from a file (``search.export`` output or a search's
``best_config.yaml``), a search run (``--run RUN_ID``) or a registered model (``--model
models:/NAME/VERSION``); checked before Ray starts. A config carries its knobs, backbone and
settings; the test data set brings its classes (and the method YAML's
``datasets.<name>.settings``)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from methods.base import OvssError

REQUIRED = ("method", "backbone", "settings", "params")


def required_knobs(config: Mapping[str, Any]) -> list[str]:
    """Every knob decode reads: the method YAML's defaults after the backbone's overrides."""
    from methods.spec import load_method_spec

    spec = load_method_spec(config["method"])
    bb = spec.backbones.get(str(config.get("backbone_name") or config["backbone"].get("name")))
    return list({**spec.defaults, **(bb.defaults if bb else {})})


def check_config(config: Any, what: str) -> dict[str, Any]:
    """OvssError naming the first missing field or knob of a tuned config."""
    if not isinstance(config, dict):
        raise OvssError(f"{what}: expected a mapping (a tuned config)")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise OvssError(f"{what}: tuned config lacks {', '.join(missing)}")
    from methods import method_module_name

    method_module_name(config["method"])  # unknown method -> one line
    knobs = [k for k in required_knobs(config) if k not in config["params"]]
    if knobs:
        raise OvssError(f"{what}: tuned config lacks knob(s) {', '.join(knobs)} of method "
                        f"{config['method']}")
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    from methods.infer import read_config_file

    return check_config(read_config_file(path), str(path))


def config_from_run(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The ``best_config.yaml`` artifact of a search run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise OvssError(f"no MLflow run {run_id!r} in {tracking_uri}") from None
    with tempfile.TemporaryDirectory() as d:
        try:
            local = client.download_artifacts(run_id, "best_config.yaml", d)
        except Exception:
            raise OvssError(f"run {run_id} has no best_config.yaml artifact (not a finished "
                            "search run)") from None
        config = yaml.safe_load(Path(local).read_text())
    config.setdefault("provenance", {}).setdefault("parent_run_id", run_id)
    return check_config(config, f"run {run_id}")


def load_source(config: str | None, run: str | None, model: str | None,
                tracking_uri: str) -> tuple[dict[str, Any], str]:
    """(tuned config, a one-word description of where it came from)."""
    if model:
        from methods.mlflow_store import config_from_model_uri

        return check_config(config_from_model_uri(model, tracking_uri), model), model
    if run:
        return config_from_run(run, tracking_uri), f"run:{run}"
    return load_config_file(config), str(config)


def dataset_settings(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The config's settings, with the method YAML's ``datasets.<dataset>.settings`` applied when
    the test data set is not the one it was tuned on (a data set brings its own settings)."""
    from methods.spec import load_method_spec

    settings = dict(config["settings"])
    if dataset != config.get("dataset"):
        spec = load_method_spec(config["method"])
        if dataset in spec.datasets:
            settings.update(spec.datasets[dataset].settings)
    return settings


def check_classes(config: Mapping[str, Any], data: Any) -> None:
    """The method can tell the test data set's classes apart under the config's settings
    (``Segmenter.check_classes``; ``data``: a scoring.EvalData); OvssError naming the data set
    otherwise, before Ray."""
    from methods import get_segmenter_class

    try:
        get_segmenter_class(config["method"]).check_classes(
            dataset_settings(config, data.dataset), data.classes)
    except OvssError as e:
        raise OvssError(f"data set {data.dataset}: {e}") from None


def paper_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its knobs replaced by the method's paper defaults: its search's trial 0
    (``defaults``, a preset's when the search ran one), else the YAML ``defaults`` after the
    backbone's overrides, as :func:`search.core.config.resolve` gives them."""
    from methods.spec import load_method_spec
    from search.core.config import resolve

    if isinstance(config.get("defaults"), Mapping) and set(config["defaults"]) == set(
            config["params"]):
        return {**config, "params": dict(config["defaults"])}
    spec = load_method_spec(config["method"])
    name = config.get("backbone_name") or config["backbone"].get("name")
    if name not in spec.backbones:
        raise OvssError(f"--baseline paper: backbone {name!r} of the config is not in "
                        f"conf/methods/{config['method']}.yaml")
    resolved = resolve(spec, name, config.get("dataset"))
    return {**config, "params": dict(resolved.defaults)}
