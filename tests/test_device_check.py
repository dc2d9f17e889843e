"""bench/device_check.sh, the GPU machine's one-call check (docs/gpu.md), run here as its CPU
dry run (``--cpu``: the ``gpu`` tests with ``OVSS_GPU_TESTS_DEVICE=cpu``, each method's bench on
its tiny backbone), so that neither the script, the tests nor the benches' device code can rot
between GPU runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from methods import METHODS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"[0-9.]+(?:e[+-]?[0-9]+)?"


def test_device_check_cpu_dry_run():
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/device_check.sh", "--cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    lines = out.splitlines()
    assert lines[-1].startswith("device check: all ") and " on cpu " in lines[-1]
    assert "== gpu-tests: rc=0" in out
    counts = [ln for ln in lines if re.match(r"^\d+ passed", ln)]
    assert counts and "failed" not in counts[-1] and "error" not in counts[-1], counts
    # the comparisons ran, not skipped: per method (one profile, --cpu's OVSS_GPU_TESTS_QUICK)
    # 2 precisions x 4 comparisons + infer + peak memory, less 2 score comparisons where the
    # method has no scores
    assert int(counts[-1].split()[0]) >= 8 * len(METHODS)
    for method in METHODS:
        assert f"[cpu] methods.infer {method} --device cpu: 100.00% of the pixels" in out
        summary = [ln for ln in lines if ln.startswith(f"summary: {method} ")]
        assert len(summary) == 1, summary
        assert re.fullmatch(
            rf"summary: {method} device=cpu extract_img_per_s={NUMBER} "
            rf"decode_ms_per_trial={NUMBER} decode_ms_per_image={NUMBER} "
            rf"ratio={NUMBER} evidence_mb={NUMBER}", summary[0]), summary[0]
