"""What a user reads (search.core.console): scores in percent with their name, commands that
run as printed, undefined metrics recorded with their reason, and the libraries' chatter behind
``--verbose`` (a real search's console, quiet and verbose: tests/test_two_searches.py)."""

from __future__ import annotations

import logging
import math
import os
import sys
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from rewards.clip_contrastive import why_constant
from rewards.fidelity import undefined_reason
from search.core import console
from search.engine.outputs import constant_reward
from search.record.tracking import log_metrics


def test_scores_print_in_percent_with_their_name():
    assert console.score_text("miou", 0.0546) == "mIoU 5.46 %"
    assert console.score_text("clip", 0.4375) == "CLIP reward 43.75 %"
    assert console.score_text("clip_score", 1.0) == "CLIP reward 100.00 %"
    assert console.percent(math.nan) == "n/a" and console.percent(None) == "n/a"


def test_commands_name_this_interpreter_and_its_mlflow(tmp_path):
    cmd = console.python_command("-m", "search.export", "--out", str(tmp_path / "a b.yaml"))
    assert cmd.startswith(sys.executable + " -m search.export")
    assert "'" in cmd   # the path with a space is quoted: one argument in a shell
    ui = console.mlflow_command("ui", "--backend-store-uri", "sqlite:///x.db")
    exe = ui.split()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    assert exe == os.path.join(os.path.dirname(sys.executable), "mlflow")


def test_undefined_metrics_are_logged_with_their_reason(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("e")).info.run_id
    log_metrics(client, run, {"a": 0.5, "rho": math.nan, "iou/cat": math.nan, "big": math.inf,
                              "none": None}, 0, why={"rho": "all trials tie"})
    data = client.get_run(run).data
    assert data.metrics["a"] == 0.5
    assert math.isnan(data.metrics["rho"]) and math.isnan(data.metrics["iou/cat"])
    assert data.tags["ovss_undefined/rho"] == "all trials tie"
    assert "ovss_undefined/iou/cat" not in data.tags        # NaN itself says it; no reason given
    assert "big" not in data.metrics and data.tags["ovss_nonfinite/big"].startswith("inf")
    assert "none" not in data.metrics


@pytest.mark.parametrize("rewards, mious, expect", [
    ([0.1, 0.2], [0.3, 0.4], "2 trial(s) with both scores"),
    ([0.1, 0.2, math.nan, 0.3], [0.3, 0.4, 0.5, math.nan], "2 trial(s) with both scores"),
    ([0.0, 0.0, 0.0], [0.1, 0.2, 0.3], "the reward is the same for all 3 trials (0.00 %)"),
    ([0.1, 0.2, 0.3], [0.5, 0.5, 0.5], "mIoU is the same for all 3 trials (50.00 %)"),
    ([0.1, 0.2, 0.3], [0.3, 0.1, 0.2], None),
])
def test_why_a_rank_correlation_is_undefined(rewards, mious, expect):
    why = undefined_reason(rewards, mious)
    if expect is None:
        assert why is None
    else:
        assert why is not None and why.startswith(expect)


def test_why_a_reward_is_constant():
    none_scored = [{"clip_images": 4, "clip_unscored_images": 4, "clip_wins": 0}] * 2
    assert why_constant(none_scored).startswith("no image could be scored")
    no_wins = [{"clip_images": 4, "clip_unscored_images": 0, "clip_wins": 0}] * 2
    assert why_constant(no_wins).startswith("no predicted mask of a labelled class beat")
    same = [{"clip_images": 4, "clip_unscored_images": 0, "clip_wins": 3}] * 2
    assert why_constant(same).startswith("every trial's masks won the same")


class _Tags:
    def __init__(self):
        self.tags = {}

    def set_tag(self, run_id, key, value):
        self.tags[key] = value


def test_a_constant_label_free_ranking_is_said(capsys):
    plan = SimpleNamespace(reward={"name": "clip"})
    counts = {"clip_images": 2.0, "clip_unscored_images": 0.0, "clip_wins": 0.0}
    rows = [{"images": 4, "score": 0.0, "metrics": counts} for _ in range(3)]
    rows.append({"images": 2, "score": 0.5, "metrics": {}})   # pruned: not compared
    client = _Tags()
    constant_reward(client, "p", plan, rows)
    tag = client.tags["ovss_reward_constant"]
    assert tag.startswith("the CLIP reward was 0.00 % for all 3 trials")
    assert "no predicted mask" in tag
    assert capsys.readouterr().err == f"note: {tag}\n"
    client = _Tags()
    rows[1] = {"images": 4, "score": 0.25, "metrics": counts}
    constant_reward(client, "p", plan, rows)
    assert client.tags == {} and capsys.readouterr().err == ""


def test_quiet_libraries_leaves_warnings_on(monkeypatch):
    import optuna

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    before = {n: logging.getLogger(n).level for n in ("mlflow", "optuna", "alembic",
                                                      console.RAY_TOKEN_NOTICE_LOGGER)}
    try:
        console.quiet_libraries(verbose=True)      # --verbose: nothing changes
        assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
        console.quiet_libraries()
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.INFO)
        assert console.tune_env() == {"RAY_AIR_NEW_OUTPUT": "0"} and console.tune_env(True) == {}
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
        optuna.logging.set_verbosity(optuna.logging.INFO)
