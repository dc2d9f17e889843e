"""The MLflow UI opens a search's experiment on its runs table: ``mlflow server --app-name ovss``
(search/mlflow_app.py), checked over HTTP and in headless Chromium (Debian's package)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.mlflow_app import SCRIPT, WORKFLOW_KEY, inject
from tests.servers import mlflow_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_inject_puts_the_script_first_in_the_head_once():
    page = '<!doctype html><html><head><script defer src="main.js"></script></head></html>'
    out = inject(page)
    assert out.index(SCRIPT) < out.index("main.js")      # before the UI's bundle reads the key
    assert inject(out) == out and out.count(WORKFLOW_KEY) == 2
    assert inject("no head here") == "no head here"


def _browser(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """One headless Chromium load of ``url`` with its own profile (its own localStorage)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900",
         "--virtual-time-budget=20000", *mode, url],
        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_ovss_server_opens_a_new_experiment_on_the_runs_table(tmp_path):
    url, proc = mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}",
                              extra=["--app-name", "ovss"])
    try:
        html = urllib.request.urlopen(f"{url}/", timeout=10).read().decode()
        assert SCRIPT in html and html.index(SCRIPT) < html.index("static/js/main.")
        client = MlflowClient(url)                          # the API is MLflow's own
        exp = client.create_experiment("clipseg/tiny/voc21")
        run = client.create_run(exp, run_name="search-ui-check")
        client.set_terminated(run.info.run_id)
        if CHROMIUM is None:
            pytest.skip("no chromium here (Debian package `chromium`): the page check ran "
                        "over HTTP only")
        page = f"{url}/#/experiments/{exp}"
        fresh = _browser(page, tmp_path / "profile-a", "--dump-dom").stdout
        # The runs table: the run's row and the model-training navigation.
        assert "search-ui-check" in fresh and "Run Name" in fresh
        assert "runs?startTime=ALL&amp;workflowType=machine_learning" in fresh
        assert "overview/usage" not in fresh
        # The same page in the GenAI view (what MLflow 3.17 opens without the app): no runs
        # table, so the check above tells the two apart.
        genai = _browser(page + "?workflowType=genai", tmp_path / "profile-b",
                         "--dump-dom").stdout
        assert "overview/usage" in genai and "search-ui-check" not in genai
    finally:
        stop(proc)
