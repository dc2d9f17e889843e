"""The MLflow UI opens a search's experiment on its runs table: ``mlflow server --app-name ovss``
(search/mlflow_app.py), checked over HTTP and in headless Chromium (Debian's package); and it
shows a cost-aware search's Pareto front (table and plot) on the parent run."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.mlflow_app import SCRIPT, WORKFLOW_KEY, inject
from tests.servers import mlflow_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: A link of the experiment page's GenAI navigation, in MLflow 3.17 and 3.18 alike (3.18 moved
#: its "overview/usage" link, which this test looked for until then, to "overview").
GENAI_NAV = "traces?workflowType=genai"
#: The runs table's link in the model-training navigation.
RUNS_NAV = "runs?startTime=ALL&amp;workflowType=machine_learning"


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


def _rendered(url: str, profile: Path, tries: int = 3) -> str:
    """The DOM of ``url`` once the app has drawn an experiment view: the runs table ("Run Name")
    or the GenAI navigation (:data:`GENAI_NAV`). A load that drew neither (the virtual-time
    budget over before the app's fetches returned; not seen so far, a guard) is retried with a
    fresh profile; a page that drew a view is returned as it is, right or wrong, for the test to
    judge. On a failure the page's text is in the message: that is how CI's failure of
    2026-12-07 showed MLflow 3.18's changed navigation rather than a page not drawn."""
    dom = ""
    for i in range(tries):
        dom = _browser(url, profile.with_name(f"{profile.name}-{i}"), "--dump-dom").stdout
        if "Run Name" in dom or GENAI_NAV in dom:
            return dom
    text = " ".join(re.sub(r"<(style|script)[^>]*>.*?</\\1>|<[^>]+>", " ", dom,
                           flags=re.S).split())
    raise AssertionError(f"{url}: no experiment view after {tries} loads; "
                         f"page text: {text[-1500:]}")


@pytest.fixture(scope="module")
def ovss_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    url, proc = mlflow_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", extra=["--app-name", "ovss"])
    try:
        yield url, tmp
    finally:
        stop(proc)


@pytest.mark.slow
def test_the_ovss_server_opens_a_new_experiment_on_the_runs_table(ovss_server):
    url, tmp_path = ovss_server
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
    fresh = _rendered(page, tmp_path / "profile-a")
    # The runs table: the run's row and the model-training navigation.
    assert "search-ui-check" in fresh and "Run Name" in fresh
    assert RUNS_NAV in fresh and GENAI_NAV not in fresh
    # The same page in the GenAI view (what MLflow 3.17 and 3.18 open without the app): no runs
    # table, so the check above tells the two apart.
    genai = _rendered(page + "?workflowType=genai", tmp_path / "profile-b")
    assert GENAI_NAV in genai and "search-ui-check" not in genai and RUNS_NAV not in genai


@pytest.mark.slow
def test_the_parent_run_shows_the_pareto_front(ovss_server):
    """search.engine.pareto.log_front on a parent run of this server (the front of four
    trials, one over the budget), then the run's artifact pages in Chromium: the table lists the
    front's rows, the plot is an image the page loaded."""
    from types import SimpleNamespace

    from methods.spec import FloatParam
    from search.engine.pareto import log_front

    url, tmp_path = ovss_server
    client = MlflowClient(url)
    exp = client.create_experiment("toycost/tiny/front-ui")
    parent = client.create_run(exp, run_name="front-ui", tags={"ovss_role": "search"}).info.run_id
    kids = [client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
            for _ in range(4)]
    rows = [{"score": s, "seconds": t, "images": 4, "params": {"temp": x}, "trial_id": f"t{i}"}
            for i, (s, t, x) in enumerate([(0.71, 0.020, 0.1), (0.65, 0.011, 0.2),
                                           (0.60, 0.030, 0.3), (0.80, 0.090, 0.4)])]
    plan = SimpleNamespace(reward={"name": "miou"}, cost=SimpleNamespace(budget=0.05),
                           resolved=SimpleNamespace(space={"temp": FloatParam(
                               type="float", low=0.01, high=1.0)}))
    callback = SimpleNamespace(numbers={f"t{i}": i for i in range(4)},
                               runs={f"t{i}": kids[i] for i in range(4)})
    table = log_front(client, parent, plan, rows, callback)
    assert [r["trial"] for r in table] == [1, 0, 3]      # trial 2 is dominated by trial 0
    assert client.get_run(kids[3]).data.tags["ovss_pareto"] == "1"
    assert "ovss_pareto" not in client.get_run(kids[2]).data.tags
    client.set_terminated(parent)
    if CHROMIUM is None:
        pytest.skip("no chromium here (Debian package `chromium`)")
    page = f"{url}/#/experiments/{exp}/runs/{parent}/artifacts"
    dom = _browser(f"{page}/pareto_front.csv", tmp_path / "profile-c", "--dump-dom").stdout
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert "Previewing the first 3 rows" in text
    assert "trial miou seconds_per_image within_budget temp run_id" in text
    assert f"1 0.65 0.011 True 0.2 {kids[1]}" in text and f"3 0.8 0.09 False 0.4 {kids[3]}" in text
    dom = _browser(f"{page}/plots/pareto_front.png", tmp_path / "profile-d", "--dump-dom").stdout
    # The UI fetched the PNG and shows it (a blob: URL made from the downloaded bytes).
    assert re.search(r'<img alt="plots/pareto_front.png" src="blob:', dom), dom[-2000:]
