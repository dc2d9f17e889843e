"""A live progress line for a search, on stderr (Tune's own reporter is off: ``verbose=0``).

    trials 12/32 done (3 pruned, 1 failed) | best mIoU 43.12 % (trial 7) | 0:04:10 elapsed,
    ~0:06:57 left  (one line)

On a terminal the line is rewritten in place (``\\r``); in a log file one line is written per
finished trial. "Remaining" is the mean time per finished trial times the trials left (trials run
concurrently, so it is the wall time at the current pace). Scores print in percent with their
name (:mod:`search.core.console`).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from ray import tune

from search.core.console import score_text


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLine(tune.Callback):
    """Counts finished, pruned (stopped by ASHA before the last rung) and failed trials and
    keeps the best final score with its trial number (0 = the paper defaults)."""

    def __init__(self, total: int, stream: TextIO | None = None, metric: str = "miou"):
        self.total = int(total)
        self.metric = metric
        self.stream = stream
        self.start = time.time()
        self.done = self.pruned = self.failed = 0
        self.best: tuple[float, int] | None = None
        self.last: dict[str, dict[str, Any]] = {}
        self._numbers: dict[str, int] = {}
        self.device_warned: set[str] = set()   # nodes whose GPU fallback was reported

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        d = dict(self.__dict__)
        d["stream"] = None
        return d

    def _number(self, trial) -> int:
        from search.record.trials import creation_number

        if trial.trial_id not in self._numbers:
            self._numbers[trial.trial_id] = creation_number(trial, len(self._numbers))
        return self._numbers[trial.trial_id]

    def line(self) -> str:
        finished = self.done + self.failed
        elapsed = time.time() - self.start
        left = (elapsed / finished * (self.total - finished)) if finished else None
        best = (f"best {score_text(self.metric, self.best[0])} (trial {self.best[1]})"
                if self.best else "best -")
        return (f"trials {finished}/{self.total} done ({self.pruned} pruned, {self.failed} "
                f"failed) | {best} | {_hms(elapsed)} elapsed"
                + (f", ~{_hms(left)} left" if left is not None else ""))

    def _show(self, final: bool = False) -> None:
        out = self.stream or sys.stderr
        if out.isatty():
            out.write("\r" + self.line().ljust(100) + ("\n" if final else ""))
        else:
            out.write(self.line() + "\n")
        out.flush()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._number(trial)
        self.last[trial.trial_id] = dict(result)
        note, node = result.get("device_note"), result.get("node_id")
        if note and node not in self.device_warned:   # once per node (search.core.devices)
            self.device_warned.add(node)
            out = self.stream or sys.stderr
            out.write(("\n" if out.isatty() else "") + f"warning: trials on {note}\n")
            out.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id, {})
        self.done += 1
        rungs = last.get("rungs_total")
        if rungs is not None and int(last.get("rung", 0)) + 1 < int(rungs):
            self.pruned += 1
        elif "score" in last:
            score = float(last["score"])
            if self.best is None or score > self.best[0]:
                self.best = (score, self._number(trial))
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._show()

    def on_experiment_end(self, trials, **info):
        out = self.stream or sys.stderr
        if out.isatty():
            out.write("\n")
            out.flush()
