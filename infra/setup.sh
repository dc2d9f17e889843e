#!/usr/bin/env bash
# Create ./.venv and install ovss-tune into it (editable), with the test extras.
# torch comes first, pinned, so that no later requirement makes pip pick a different torch build
# (on these CPU machines 2.14.1 + torchvision 0.29.1 install from local disk; on a GPU machine the
# same pins are the CUDA build). Set OVSS_TORCH="torch==X torchvision==Y" to choose another pair.
# Run again, it only checks: .venv/.ovss-setup records what the last complete install was made
# from (this script, pyproject.toml, the torch pins, the Python); when that still matches and
# the packages are there, nothing is installed (.ci/run relies on it: it installs while Debian's
# packages install, then runs README's test line, which starts with this script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${OVSS_TORCH:-torch==2.14.1 torchvision==0.29.1}
STAMP=.venv/.ovss-setup
want=$({ cat infra/setup.sh pyproject.toml; echo "$TORCH"; "$PY" -VV; } | sha256sum | cut -d' ' -f1)
PKGS="torch ray optuna mlflow open_clip transformers segment_anything"   # what both checks look for
check() {
    .venv/bin/python -c "import ${PKGS// /, }; \
print('ovss-tune installed: torch', torch.__version__, '| ray', ray.__version__, '| optuna', \
optuna.__version__, '| mlflow', mlflow.__version__)"
}
# Run again with a matching stamp: the packages are there (found, not imported: importing them
# all takes ~6 s, and README's commands start with this script) at the versions they had.
present() {
    .venv/bin/python -c "import importlib.util as u; from importlib.metadata import version as v; \
gone = [m for m in '$PKGS'.split() if u.find_spec(m) is None]; assert not gone, gone; \
print('ovss-tune installed: torch', v('torch'), '| ray', v('ray'), '| optuna', v('optuna'), \
'| mlflow', v('mlflow'))"
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && present 2>/dev/null; then
    echo "(.venv is up to date: $STAMP matches this script, pyproject.toml and the pins)"
    exit 0
fi
rm -f "$STAMP"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# uv installs the same requirements as pip several times faster (a fresh venv, this 2-core
# machine: torch, torchvision and ".[test]" in 44 s against pip's 88 + 49 s), from the same
# places: infra/pip_to_uv.py turns pip's configuration (its files and PIP_* variables: indexes,
# local wheels, constraint files, certificate) into uv's options, and unsafe-best-match picks the
# newest version across all indexes, as pip does. Where uv cannot be installed, or with
# OVSS_INSTALLER=pip, pip installs as before.
# Both skip compiling to bytecode: compileall below does it on all cores, with this repository's
# sources too (a fresh venv, 2 cores: pip's two installs spent 51 + 57 s compiling; 41 + 24 s
# without, then 31 s of compileall). Compiled ahead, because where PYTHONDONTWRITEBYTECODE is set
# (these machines) no import writes a .pyc: every process would compile what it imports, torch
# included (its import 1.5 -> 3.3 s). compileall fails on the files that are not Python 3.11
# (torch's py312_intrinsics.py), which pip skips silently too.
if [ "${OVSS_INSTALLER:-uv}" = uv ] && python -m pip install -q uv >/dev/null 2>&1; then
    # assigned first, so that set -e stops here if pip's configuration cannot be read
    opts=$(python infra/pip_to_uv.py)
    envs=$(python infra/pip_to_uv.py --env)
    uv_opts=(); uv_env=()
    if [ -n "$opts" ]; then mapfile -t uv_opts <<<"$opts"; fi
    if [ -n "$envs" ]; then mapfile -t uv_env <<<"$envs"; fi
    env "${uv_env[@]}" python -m uv pip install -q --python .venv/bin/python \
        --index-strategy unsafe-best-match "${uv_opts[@]}" $TORCH -e ".[test]"
else
    python -m pip install -q --upgrade pip
    python -m pip install -q --no-compile $TORCH
    python -m pip install -q --no-compile -e ".[test]"
fi
# Not compiled: the installed packages' own test suites and the transformers models no method
# here uses (a fifth of the sources; compileall 40 -> 29 s), and parts of packages that nothing
# here imports (Ray's RLlib, Serve and LLM libraries, sympy.physics, scipy.signal: 14 of 237 MB
# of sources).
# A module missing from the lists only imports slower where PYTHONDONTWRITEBYTECODE is set.
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
skip='site-packages/(.+/)?tests?/|site-packages/transformers/models/(?!(auto|bert|blip|'
skip+='bridgetower|clip|dinov2|dinov2_with_registers|encoder_decoder|llama|llava|llava_next|vit)/)'
skip+='|site-packages/(setuptools/_vendor|sympy/physics|scipy/signal|ray/(rllib|serve|llm))/'
python -m compileall -q -j 0 -x "$skip" "$site" search methods rewards bench tests \
    >/dev/null 2>&1 || true
check
echo "$want" > "$STAMP"
