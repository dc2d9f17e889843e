"""Cost-aware searches end to end (local Ray, Optuna, MLflow sqlite) on the method of known cost
(tests/toy_cost_method.py: decode sleeps ``work`` x 0.03 s): a two-objective search under a
budget, read back through the MLflow client and checked against the test's own computation of
the front, the best config within the budget and the picks; a warm-started search that patience
stops; a budget no config meets. One record, built once for the module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.export import main as export_main
from search.run import main as run_main

pytestmark = pytest.mark.slow

BUDGET = 0.055          # seconds per image: work 0 (~0.01 s) meets it, work 2 and 3 (>= 0.06) not
STEP = 0.03             # seconds decode sleeps per unit of work
KNOBS = ("temp", "thr", "mode", "pool", "work")


def _dominated_by(a, b) -> bool:
    return (b["score"] >= a["score"] and b["seconds"] <= a["seconds"]
            and (b["score"] > a["score"] or b["seconds"] < a["seconds"]))


class Record:
    def __init__(self, root: Path, voc_root: Path):
        self.root, self.voc = root, voc_root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)

    def search(self, capsys, *extra: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = run_main(["--method", "toycost", "--dataset", "voc21", "--data-root", str(self.voc),
                       "--max-images", "4", "--rungs", "1", "--tracking-uri", self.uri,
                       "--cache-dir", str(self.root / "cache"), "--storage",
                       str(self.root / "ray"), "--set", f"settings.decode_step={STEP}", *extra])
        out, err = capsys.readouterr()
        return rc, out, err

    def parent(self, name: str):
        runs = self.client.search_runs(
            [e.experiment_id for e in self.client.search_experiments()],
            f"tags.ovss_role = 'search' and tags.ovss_search_name = '{name}'")
        assert len(runs) == 1
        return runs[0]

    def children(self, parent):
        return self.client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            max_results=1000)


@pytest.fixture(scope="module")
def record(tmp_path_factory, voc_root, ray_session):
    root = tmp_path_factory.mktemp("cost")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)          # MLflow's artifact root (./mlruns) lands here
        yield Record(root, voc_root)


@pytest.fixture(scope="module")
def front_search(record):
    import contextlib

    capture = _Capture()
    with contextlib.redirect_stdout(capture.out), contextlib.redirect_stderr(capture.err):
        # Two rungs: ASHA would stop some trials at 2 images, were it on (it is not with two
        # objectives: every trial is scored on every image).
        rc, out, err = record.search(capture, "--num-samples", "8", "--seed", "2", "--rungs", "2",
                                     "--objectives", "miou,seconds",
                                     "--max-seconds-per-image", str(BUDGET), "--name", "front")
    assert rc == 0, err
    return out


class _Capture:
    """capsys for a module-scoped fixture: what run_main prints, through redirected streams."""

    def __init__(self):
        import io

        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self):
        out, err = self.out.getvalue(), self.err.getvalue()
        self.out.seek(0)
        self.out.truncate()
        self.err.seek(0)
        self.err.truncate()
        return out, err


def _points(record, parent):
    """The fully scored trials as points, from the child runs' own metrics."""
    out = []
    for c in record.children(parent):
        m = c.data.metrics
        if c.info.status == "FINISHED" and "miou" in m:
            out.append({"score": m["miou"], "seconds": m["cost/seconds_per_image"],
                        "run": c, "params": c.data.params})
    return out


def test_front_tags_table_plot_importances(record, front_search):
    parent = record.parent("front")
    assert parent.info.status == "FINISHED"
    points = _points(record, parent)
    assert len(points) == 8               # two objectives: no ASHA, every trial fully scored
    front = [p for p in points if p["run"].data.tags.get("ovss_pareto") == "1"]
    rest = [p for p in points if p not in front]
    assert front
    for a in front:      # mutually non-dominated
        assert not any(_dominated_by(a, b) for b in front if b is not a)
    for a in rest:       # every other trial is dominated by a member
        assert any(_dominated_by(a, b) for b in front), a
    tmp = record.root / "dl-front"
    tmp.mkdir(exist_ok=True)
    csv = Path(record.client.download_artifacts(parent.info.run_id, "pareto_front.csv", tmp))
    lines = csv.read_text().splitlines()
    assert lines[0] == "trial,miou,seconds_per_image,within_budget,temp,thr,mode,pool,work,run_id"
    assert {ln.split(",")[-1] for ln in lines[1:]} == {p["run"].info.run_id for p in front}
    arts = {a.path for a in record.client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in arts
    m = parent.data.metrics
    assert m["pareto/size"] == len(front) and m["pareto/trials"] == 8
    imp = {k: v for k, v in m.items() if k.startswith("importance/")}
    assert set(imp) == {f"importance/{k}" for k in KNOBS}
    assert sum(imp.values()) == pytest.approx(1.0, abs=1e-6)
    assert {f"importance_seconds/{k}" for k in KNOBS} <= set(m)
    assert parent.data.tags["ovss_stop_reason"] == "num_samples: all 8 trials ran"
    assert m["stopped_after_trials"] == 8
    assert m["cost/extract_s"] > 0 and parent.data.tags["ovss_cost_device"].startswith("cpu:")
    for p in points:     # the decode sleep is in the measured seconds
        cm = p["run"].data.metrics
        assert cm["cost/decode_s"] >= STEP * int(p["params"]["work"])
        assert p["seconds"] == pytest.approx(cm["cost/extract_s"] + cm["cost/extend_s"]
                                             + cm["cost/decode_s"])
    # The summary: the front's table, the best config within the budget, the fastest near it.
    assert "Pareto front (" in front_search and "| trial | mIoU (%) | seconds_per_image |" \
        in front_search
    assert "best mIoU " in front_search and "(within --max-seconds-per-image 0.055)" \
        in front_search
    assert "fastest within 1.00 % mIoU of it: " in front_search


def test_budget_best_and_export_picks(record, front_search):
    parent = record.parent("front")
    points = _points(record, parent)
    feasible = [p for p in points if p["seconds"] <= BUDGET]
    assert feasible, "trial 0 (work 0) should meet the budget"
    best = max(feasible, key=lambda p: (p["score"], -p["seconds"]))
    tmp = record.root / "dl-best"
    tmp.mkdir(exist_ok=True)
    cfg = yaml.safe_load(Path(record.client.download_artifacts(
        parent.info.run_id, "best_config.yaml", tmp)).read_text())
    assert cfg["cost"]["seconds_per_image"] <= BUDGET
    assert cfg["cost"]["seconds_per_image"] == pytest.approx(best["seconds"])
    assert cfg["provenance"]["trial_run_id"] == best["run"].info.run_id
    assert cfg["metric"]["value"] == pytest.approx(best["score"])
    # search.export --pick: from the front, as the test computes it
    front = [p for p in points if p["run"].data.tags.get("ovss_pareto") == "1"]
    top = max(front, key=lambda p: (p["score"], -p["seconds"]))
    fast = min((p for p in front if p["score"] >= top["score"] - 0.5),
               key=lambda p: (p["seconds"], -p["score"]))
    under = max((p for p in front if p["seconds"] <= BUDGET),
                key=lambda p: (p["score"], -p["seconds"]))
    for pick, want in [("best", best), ("fastest-within=0.5", fast),
                       (f"budget={BUDGET}", under)]:
        out = record.root / f"pick-{pick}.yaml"
        assert export_main(["--method", "toycost", "--tracking-uri", record.uri, "--out",
                            str(out), "--pick", pick]) == 0
        got = yaml.safe_load(out.read_text())
        assert {k: str(got["params"][k]) for k in KNOBS} == want["params"], pick
        assert got["provenance"]["trial_run_id"] == want["run"].info.run_id, pick
    assert export_main(["--method", "toycost", "--tracking-uri", record.uri, "--out",
                        str(record.root / "x.yaml"), "--pick", "budget=0.0000001"]) == 2
    assert not (record.root / "x.yaml").exists()


def test_warm_start_then_patience_stops(record, front_search, capsys):
    earlier = record.parent("front")
    before = {tuple(sorted(p["params"].items())): p["score"] for p in _points(record, earlier)}
    # Another backbone; pool fixed (the space lacks it), thr's range narrowed (values clipped);
    # a margin of 1 no mIoU can beat: after trial 0, no trial improves.
    rc, out, err = record.search(
        capsys, "--backbone", "other", "--warm-start", earlier.info.run_id,
        "--warm-start-top", "2", "--set", "pool=1", "--set", "space.thr.high=0.1",
        "--patience", "2", "--patience-margin", "1", "--max-concurrent", "1",
        "--num-samples", "10", "--name", "warm")
    assert rc == 0, err
    parent = record.parent("warm")
    kids = sorted(record.children(parent), key=lambda c: int(c.data.tags["ovss_trial_number"]))
    assert len(kids) == 3                       # trial 0, two non-improving trials: stop
    assert parent.data.tags["ovss_stop_reason"].startswith(
        "patience: 2 trials in a row brought no improvement beyond 1 (after 3 trials)")
    assert parent.data.metrics["stopped_after_trials"] == 3
    assert "stopped: patience" in out
    assert kids[0].data.params["temp"] == "0.2"                 # the other backbone's default
    # Trials 1 and 2: the earlier search's two best configs (best first), pool dropped, thr
    # clipped into [0.05, 0.1].
    top = sorted(before.values(), reverse=True)[:2]
    got = []
    for kid in kids[1:]:
        p = kid.data.params
        match = [(dict(k), s) for k, s in before.items()
                 if dict(k)["temp"] == p["temp"] and dict(k)["mode"] == p["mode"]
                 and dict(k)["work"] == p["work"]
                 and min(float(dict(k)["thr"]), 0.1) == pytest.approx(float(p["thr"]))]
        assert match, p
        assert "pool" not in p
        got.append(max(s for _, s in match))
    assert got == pytest.approx(top)
    line = next(ln for ln in err.splitlines() if ln.startswith("warm start: "))
    assert f"2 config(s) of search {earlier.info.run_id} enqueued after the paper defaults" in line
    assert "dropped pool (not searched here)" in line
    if any(float(dict(k)["thr"]) > 0.1 for k, s in before.items() if s in top):
        assert "clipped thr" in line
    # This search measured no cost: search.export has no front to pick from.
    assert export_main(["--method", "toycost", "--backbone", "other", "--tracking-uri",
                        record.uri, "--out", str(record.root / "y.yaml"), "--pick",
                        "fastest-within=0.01"]) == 2
    assert "has no Pareto front" in capsys.readouterr().err
    assert not (record.root / "y.yaml").exists()


def test_a_budget_no_config_meets(record, front_search, capsys):
    # A microsecond: no config's extract + extend + decode of an image takes less.
    rc, out, err = record.search(capsys, "--max-seconds-per-image", "0.000001",
                                 "--num-samples", "2", "--name", "nobudget")
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: no config meets --max-seconds-per-image 1e-06: the "
                                "cheapest config found, trial ")
    assert "s per image" in errors[0] and "'work'" in errors[0]
    parent = record.parent("nobudget")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["ovss_stop_reason"].startswith("budget: no config meets")
    exps = [e.experiment_id for e in record.client.search_experiments()]
    assert not record.client.search_runs(exps, "attributes.status = 'RUNNING'")
    assert os.path.exists(record.root / "mlflow.db")
