#!/usr/bin/env bash
# Create ./.venv and install ovss-tune into it (editable), with the test extras.
# torch comes first, pinned, so that no later requirement makes pip pick a different torch build
# (on these CPU machines 2.14.1 + torchvision 0.29.1 install from local disk; on a GPU machine the
# same pins are the CUDA build). Set OVSS_TORCH="torch==X torchvision==Y" to choose another pair.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ${OVSS_TORCH:-torch==2.14.1 torchvision==0.29.1}
python -m pip install -q -e ".[test]"
python -c "import torch, ray, optuna, mlflow, open_clip, transformers, segment_anything; \
print('ovss-tune installed: torch', torch.__version__, '| ray', ray.__version__, '| optuna', \
optuna.__version__, '| mlflow', mlflow.__version__)"
