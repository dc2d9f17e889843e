"""Put on PYTHONPATH by ``bench/device_check.sh --cpu``: the GPU machine has no Ray, Optuna or
MLflow (docs/gpu.md), so the dry run refuses to import them too, and a gpu test or a bench that
starts to need them fails here, in CI, not on the GPU machine."""

import importlib.abc
import sys

ABSENT = ("ray", "mlflow", "optuna")


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine has none; "
                                      "tests/device_env/sitecustomize.py)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
