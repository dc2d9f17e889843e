#!/usr/bin/env bash
# Prepares .wheels/ (git-ignored): the wheels that bench/device_check.sh installs on the GPU
# machine, which has torch, torchvision, timm, transformers, tokenizers, huggingface_hub,
# safetensors, numpy, scipy, pillow, PyYAML, opencv and pytest, and cannot download anything
# (docs/gpu.md). Exactly what our code needs there and the machine lacks, for its Python 3.12
# on x86-64, without dependencies (pip download --no-deps); the versions of this checkout's
# .venv, except:
# - transformers 5.24.0: the machine's 5.17 predates the `cache=` API fseg needs (>= 5.24,
#   methods/fseg/backbone.py), and 5.25 would need huggingface_hub 2.x (and with it httpx2,
#   hf-xet, click); 5.24.0 takes the machine's huggingface_hub 1.3x and tokenizers 0.23;
# - regex and typing_extensions: transformers 5.24 and pydantic 2.14 need versions newer than
#   the machine may hold.
# Not carried: ray, optuna, mlflow (too large; the gpu tests and the benches do not import
# them), pydensecrf2 (no wheel on PyPI; PnP's CPU-only CRF: its variants are skipped there).
#
#   bash bench/device_wheels.sh        # then name .wheels in the device tool's `carry`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.wheels
LIMIT_MB=56        # of the 64 MiB a device call may carry with the working tree

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PACKAGES=(transformers==5.24.0)
for p in open_clip_torch ftfy wcwidth segment-anything pydantic pydantic_core annotated-types \
         typing-inspection typing_extensions regex; do
    PACKAGES+=("$p==$(version "$p")")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MB  %s\n", $5 / 1e6, $9}'
total=$(du -cm "$DEST"/*.whl | tail -1 | cut -f1)
if [ "$(ls "$DEST"/*.whl | wc -l)" -ne "${#PACKAGES[@]}" ]; then
    echo "device wheels: expected ${#PACKAGES[@]} wheels (one per package)"; exit 1
fi
if [ "$total" -gt "$LIMIT_MB" ]; then
    echo "device wheels: ${total} MB, more than ${LIMIT_MB} MB"; exit 1
fi
echo "device wheels: ${#PACKAGES[@]} wheels, ${total} MB in $DEST"
