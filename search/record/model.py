"""The tuned config as an MLflow model (pyfunc) that wraps :func:`methods.load_segmenter`.

A search's parent run logs ``tuned_segmenter`` (listed under the run's logged models);
``search.run --register NAME`` also registers it in the Model Registry. Then

    mlflow models serve -m models:/NAME/1 --env-manager local -h 127.0.0.1 -p 5001
    curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"image": "<base64 PNG/JPEG bytes>", "classes": "cat,dog"}]}'

answers ``{"predictions": [label map]}``: one HxW list of lists of int per row, value i = the
i-th class (0 = background when the config's data set has one). The model stores only the tuned
config; the serving environment needs this repository installed (``pip install -e .``) and the
backbone weights where the config says. ``methods.infer --config models:/NAME/VERSION`` and
``search.evaluate --model models:/NAME/VERSION`` read the config back from the registry
(:func:`methods.mlflow_store.config_from_model_uri`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from methods.base import OvssError
from methods.mlflow_store import CONFIG_FILE, using_tracking_uri

ARTIFACT = "tuned_config"
MODEL_NAME = "tuned_segmenter"


def encode_image(image: np.ndarray) -> str:
    """HxWx3 uint8 -> base64 PNG text (the ``image`` field of a request)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(text: str) -> np.ndarray:
    """base64 image file bytes (PNG, JPEG, ...) -> HxWx3 uint8 RGB (EXIF rotation applied)."""
    from methods.io import load_image

    try:
        raw = base64.b64decode(text, validate=True)
    except Exception:
        raise OvssError("image: expected base64-encoded image file bytes") from None
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(raw)
        f.flush()
        return load_image(f.name)


# MLflow warns, at class definition, that predict has no type hints (it would then validate the
# input against them); the input here is a free-form record, so the warning is kept quiet. MLflow
# resets the warning filters around that check, so the message is dropped where it is shown.
def _drop_type_hint_advice(show):
    def _show(message, category, *args, **kwargs):
        if "type hints to the `predict` method" not in str(message):
            show(message, category, *args, **kwargs)
    return _show


with warnings.catch_warnings():
    warnings.showwarning = _drop_type_hint_advice(warnings.showwarning)

    class TunedSegmenterModel(mlflow.pyfunc.PythonModel):
        """pyfunc: rows of ``{"image": base64 image, "classes": "cat,dog" | [names]}`` ->
        a list of HxW int label maps (lists of lists)."""

        def load_context(self, context) -> None:
            from methods import load_segmenter

            self.segmenter = load_segmenter(context.artifacts[ARTIFACT])

        def predict(self, context, model_input, params=None) -> list[list[list[int]]]:
            records = (model_input.to_dict("records") if hasattr(model_input, "to_dict")
                       else list(model_input) if isinstance(model_input, list) else [model_input])
            out = []
            for rec in records:
                if "image" not in rec or "classes" not in rec:
                    raise OvssError("each input row needs 'image' (base64) and 'classes'")
                names = rec["classes"]
                if isinstance(names, str):
                    names = [c.strip() for c in names.split(",") if c.strip()]
                pred = self.segmenter(decode_image(rec["image"]), list(names))
                out.append(np.asarray(pred).astype(int).tolist())
            return out


def log_tuned_model(tracking_uri: str, run_id: str, config: dict[str, Any],
                    register: str | None = None) -> str:
    """Log ``config`` as a pyfunc model on run ``run_id`` (and register it as ``register``).
    Returns the model's URI (``models:/NAME/VERSION`` when registered)."""
    with using_tracking_uri(tracking_uri):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / CONFIG_FILE
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            with mlflow.start_run(run_id=run_id), _quiet():
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=TunedSegmenterModel(),
                    artifacts={ARTIFACT: str(path)}, registered_model_name=register,
                    # listed, not inferred: inference would load the model to trace imports
                    pip_requirements=["mlflow", "numpy", "pyyaml", "pillow", "torch"])
    if register:
        return f"models:/{register}/{info.registered_model_version}"
    return info.model_uri


@contextlib.contextmanager
def _quiet():
    """MLflow's advice on type hints and CloudPickle, printed on every log_model, kept off the
    terminal (the model is a class of this repository, pickled by reference)."""
    import logging

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)

