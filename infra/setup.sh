#!/usr/bin/env bash
# Create ./.venv and install ovss-tune into it (editable), with the test extras.
# torch comes first, pinned, so that no later requirement makes pip pick a different torch build
# (on these CPU machines 2.14.1 + torchvision 0.29.1 install from local disk; on a GPU machine the
# same pins are the CUDA build). Set OVSS_TORCH="torch==X torchvision==Y" to choose another pair.
# Run again, it only checks: .venv/.ovss-setup records what the last complete install was made
# from (this script, pyproject.toml, the torch pins, the Python); when that still matches and
# the packages import, nothing is installed (.ci/run relies on it: it installs while Debian's
# packages install, then runs README's test line, which starts with this script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${OVSS_TORCH:-torch==2.14.1 torchvision==0.29.1}
STAMP=.venv/.ovss-setup
want=$({ cat infra/setup.sh pyproject.toml; echo "$TORCH"; "$PY" -VV; } | sha256sum | cut -d' ' -f1)
check() {
    .venv/bin/python -c "import torch, ray, optuna, mlflow, open_clip, transformers, segment_anything; \
print('ovss-tune installed: torch', torch.__version__, '| ray', ray.__version__, '| optuna', \
optuna.__version__, '| mlflow', mlflow.__version__)"
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && check 2>/dev/null; then
    echo "(.venv is up to date: $STAMP matches this script, pyproject.toml and the pins)"
    exit 0
fi
rm -f "$STAMP"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# pip compiles every installed file to bytecode on one core; compileall below does it on all of
# them, with this repository's sources too (a fresh venv, 2 cores: the two installs 51 + 57 s
# compiling; 41 + 24 s without, then 31 s of compileall). Compiled ahead, because where
# PYTHONDONTWRITEBYTECODE is set (these machines) no import writes a .pyc: every process would
# compile what it imports, torch included (its import 1.5 -> 3.3 s). compileall fails on the
# files that are not Python 3.11 (torch's py312_intrinsics.py), which pip skips silently too.
python -m pip install -q --no-compile $TORCH
python -m pip install -q --no-compile -e ".[test]"
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python -m compileall -q -j 0 "$site" search methods rewards bench tests >/dev/null 2>&1 || true
check
echo "$want" > "$STAMP"
