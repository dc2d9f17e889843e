#!/usr/bin/env bash
# The GPU check in one call of the `device` tool (docs/gpu.md), under 8 minutes on a bare GPU
# machine: install the carried wheels (.wheels/, made here by bench/device_wheels.sh), run the
# `gpu` tests on CUDA (tests/test_gpu.py), then each method's bench on CUDA at real sizes with
# random weights, and print per method: extraction images/s, decode ms per trial, the extract-once
# ratio and the peak GPU memory.
#
#   bash bench/device_check.sh          # on the GPU machine (python3 there holds torch)
#   bash bench/device_check.sh --cpu    # dry run here: CPU, tiny models, the same steps, one
#                                       # profile per method (CI: tests/test_device_check.py)
#   bash bench/device_check.sh --cpu --all   # the same with every profile of tests/test_gpu.py
#
# Every step runs under its own time limit and the script goes on after a failed step; the
# output ends with one `summary:` line per bench and `device check: ...`. With $OUT set (the
# device tool), the whole output is also written to $OUT/device_check.log.
set -u -o pipefail

MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
# --cpu --all: every profile of tests/test_gpu.py; --cpu alone: one per method (OVSS_GPU_TESTS_QUICK)
ALL=0
[ "${2:-}" = "--all" ] && ALL=1
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
START=$(date +%s)
# seconds for the whole check; a step is cut to what is left, and skipped under 30 s
if [ "$MODE" = cuda ]; then BUDGET=${OVSS_DEVICE_CHECK_BUDGET:-450}
else BUDGET=${OVSS_DEVICE_CHECK_BUDGET:-1500}; fi
if [ -n "${OUT:-}" ] && [ -z "${OVSS_DEVICE_CHECK_TEE:-}" ]; then
    OVSS_DEVICE_CHECK_TEE=1 bash "$0" "$@" 2>&1 | tee "$OUT/device_check.log"
    exit "${PIPESTATUS[0]}"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
STEP_LOG=$(mktemp /tmp/ovss-device-check.XXXXXX)
trap 'rm -f "$STEP_LOG"' EXIT

if [ "$MODE" = cuda ]; then
    if compgen -G ".wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ovss-site .wheels/*.whl || { echo "device check: wheel install failed"; exit 2; }
        export PYTHONPATH=/tmp/ovss-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "note: no .wheels/ (bash bench/device_wheels.sh makes it): using what is installed"
    fi
    export OVSS_GPU_TESTS_DEVICE=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
else
    export OVSS_GPU_TESTS_DEVICE=cpu
    [ "$ALL" = 1 ] || export OVSS_GPU_TESTS_QUICK=1
    # as on the GPU machine: no Ray, Optuna or MLflow to import
    export PYTHONPATH=$PWD/tests/device_env${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF'
import torch, transformers
cuda = torch.cuda.is_available()
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA "
      f"{torch.version.cuda}), transformers {transformers.__version__}; "
      f"{torch.cuda.get_device_name() if cuda else 'no CUDA device'}")
EOF

PASSED=0
FAILED=()
# step NAME SECONDS COMMAND...: run it under a time limit, print its last lines, keep score
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped (the check's ${BUDGET} s budget is spent)"
        FAILED+=("$name(skipped)"); return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$STEP_LOG" 2>&1
    rc=$?
    grep -v -e '^WARNING:root' -e '^\s*$' "$STEP_LOG" | tail -n "${TAIL:-40}"
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
    if [ "$rc" -eq 0 ]; then PASSED=$((PASSED + 1)); else FAILED+=("$name(rc=$rc)"); fi
    case "$name" in bench-*)
        local line ratio
        line=$(grep '^device=' "$STEP_LOG" | tail -1)
        ratio=$(grep '^ratio=' "$STEP_LOG" | tail -1)
        SUMMARY+=("summary: ${name#bench-} ${line:-device=? (no device line)} ${ratio:-ratio=?}")
    esac
}
SUMMARY=()

[ "$MODE" = cuda ] && LIMIT=200 || LIMIT=900
TAIL=200 step gpu-tests "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -ra

if [ "$MODE" = cuda ]; then
    step bench-clipseg 80 "$PY" bench/clipseg.py --device cuda --images 8 --trials 64
    step bench-pnp 80 "$PY" bench/pnp.py --one-stage --device cuda --images 4 --trials 64
    step bench-fseg 110 "$PY" bench/fseg.py --device cuda --layers 32 --images 2 --trials 32
else
    step bench-clipseg 120 "$PY" bench/clipseg.py --tiny --images 2 --trials 4 --naive-trials 1
    step bench-pnp 120 "$PY" bench/pnp.py --one-stage --tiny --images 1 --trials 3 --drop-iters 2
    step bench-fseg 180 "$PY" bench/fseg.py --tiny --images 1 --trials 2
fi
# Benches added later that take --device/--tiny (bench.common.add_device_args) run too.
for f in bench/*.py; do
    b=$(basename "$f" .py)
    case "$b" in clipseg|pnp|fseg|common|real_size|pnp_two_stage|__init__) continue;; esac
    grep -q "add_device_args" "$f" || continue
    if [ "$MODE" = cuda ]; then step "bench-$b" 80 "$PY" "$f" --device cuda
    else step "bench-$b" 120 "$PY" "$f" --tiny; fi
done

printf '%s\n' "${SUMMARY[@]}"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "device check: all $PASSED steps passed on $MODE in $(( $(date +%s) - START )) s"
else
    echo "device check: $PASSED passed, failed: ${FAILED[*]} on $MODE in $(( $(date +%s) - START )) s"
    exit 1
fi
