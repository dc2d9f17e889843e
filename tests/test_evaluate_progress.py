"""The live progress line of a search (search.record.progress.ProgressLine)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from search.record.progress import ProgressLine


def _trial(tid: str, number: int):
    return SimpleNamespace(trial_id=tid, experiment_tag=f"{number + 1}_temp=0.1")


def test_counts_pruned_failed_and_best_trial():
    out = io.StringIO()
    p = ProgressLine(5, stream=out)
    a, b, c, d = _trial("a", 0), _trial("b", 1), _trial("c", 2), _trial("d", 3)
    p.on_trial_result(0, [], a, {"score": 0.4, "rung": 1, "rungs_total": 2})
    p.on_trial_complete(0, [], a)
    p.on_trial_result(0, [], b, {"score": 0.9, "rung": 0, "rungs_total": 2})   # pruned
    p.on_trial_complete(0, [], b)
    p.on_trial_result(0, [], c, {"score": 0.6, "rung": 1, "rungs_total": 2})
    p.on_trial_complete(0, [], c)
    p.on_trial_error(0, [], d)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4                           # one line per finished trial (not a tty)
    assert lines[0].startswith("trials 1/5 done (0 pruned, 0 failed) | best mIoU 40.00 % "
                               "(trial 0)")
    # A pruned trial's partial score is not the best; the failed trial counts as finished.
    assert lines[-1].startswith("trials 4/5 done (1 pruned, 1 failed) | best mIoU 60.00 % "
                                "(trial 2)")
    assert "elapsed, ~" in lines[-1] and "left" in lines[-1]


def test_remaining_time_from_the_pace(monkeypatch):
    import search.record.progress as sp

    now = [1000.0]
    monkeypatch.setattr(sp.time, "time", lambda: now[0])
    p = ProgressLine(4, stream=io.StringIO())
    now[0] = 1030.0
    p.on_trial_result(0, [], _trial("a", 0), {"score": 0.5, "rung": 0, "rungs_total": 1})
    p.on_trial_complete(0, [], _trial("a", 0))
    assert p.line().endswith("0:00:30 elapsed, ~0:01:30 left")   # 30 s a trial, 3 left


def test_a_label_free_search_names_its_reward():
    out = io.StringIO()
    p = ProgressLine(2, stream=out, metric="clip")
    p.on_trial_result(0, [], _trial("a", 0), {"score": 0.125, "rung": 0, "rungs_total": 1})
    p.on_trial_complete(0, [], _trial("a", 0))
    assert "| best CLIP reward 12.50 % (trial 0) |" in out.getvalue()
