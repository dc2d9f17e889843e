"""Where a tuned config lives in MLflow: the default tracking store, and the config inside a
registered model (``models:/NAME/VERSION``), read back for ``methods.infer`` and
``search.evaluate --model``.

The one module of ``methods/`` that imports MLflow, and only when it is called: a method, and a
tuned config read from a file, never need it. The model itself (a pyfunc that wraps
:func:`methods.load_segmenter`) is written by :mod:`search.record.model`, into
:data:`CONFIG_FILE`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from methods.base import OvssError

#: The tuned config's file name inside the model's artifacts.
CONFIG_FILE = "tuned_config.yaml"
_URI = re.compile(r"^models:/([^/]+)/(\d+)$")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's fluent API (log_model, pyfunc.load_model) with ``uri`` as the global tracking
    URI; setting one also sets $MLFLOW_TRACKING_URI (read by :func:`default_tracking_uri`), so
    both are put back afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def config_from_model_uri(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The tuned config inside the registered model ``models:/NAME/VERSION``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    m = _URI.match(uri)
    if not m:
        raise OvssError(f"model {uri!r}: expected models:/NAME/VERSION")
    name, version = m.groups()
    tracking_uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri)
    try:
        client.get_model_version(name, version)
    except Exception:
        raise OvssError(f"no registered model {name!r} version {version} in {tracking_uri}") \
            from None
    # models:/ resolves through the registry URI, which follows the global tracking URI.
    with tempfile.TemporaryDirectory() as d, using_tracking_uri(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d)
        files = list(Path(local).rglob(CONFIG_FILE))
        if not files:
            raise OvssError(f"model {uri} holds no {CONFIG_FILE} (not an ovss model)")
        return yaml.safe_load(files[0].read_text())
