"""Quality against seconds per image: the objectives of a search, the Pareto front of its trials,
the deploy budget, the picks a user makes from the front, and knowing when to stop.

A *point* is a mapping with ``score`` (the reward, higher is better) and ``seconds`` (seconds per
image of the full inference pipeline, lower is better; None when the search measured no cost).
Everything here is plain Python over such points: the engine feeds it Tune's results, the record
reads it back from a run's ``pareto_front.csv``, and the tests check it against their own
transcription of the definitions (docs/cost.md).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from methods.base import OvssError

SECONDS = "seconds"               # the cost objective's name in --objectives
COST_METRIC = "cost/seconds_per_image"   # its key in a trial's results and child run metrics
REWARDS = ("miou", "clip")
FRONT_CSV = "pareto_front.csv"   # the parent run's front table (search.engine.pareto)
BUDGET_CONSTRAINT = "max_seconds_per_image"   # the Optuna constraint of --max-seconds-per-image


def parse_objectives(text: str | None, reward: str | None) -> tuple[str, tuple[str, ...]]:
    """``--objectives`` (``miou,seconds``, ``clip,seconds``, ``miou``) with ``--reward`` ->
    ``(reward, objectives)``; the reward comes first in ``objectives``. One-line OvssError for
    an unknown name, a repeated one, no reward, or a reward that ``--reward`` contradicts."""
    if not text:
        return reward or "miou", (reward or "miou",)
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in (*REWARDS, SECONDS):
            raise OvssError(f"--objectives {text}: unknown objective {n!r} (choose a reward, "
                            f"{' or '.join(REWARDS)}, and optionally {SECONDS})")
    if len(set(names)) != len(names):
        raise OvssError(f"--objectives {text}: an objective is named twice")
    rewards = [n for n in names if n in REWARDS]
    if len(rewards) != 1:
        raise OvssError(f"--objectives {text}: name exactly one reward ({' or '.join(REWARDS)})"
                        f", then optionally {SECONDS}")
    if reward and reward != rewards[0]:
        raise OvssError(f"--objectives {text} optimises {rewards[0]}, but --reward is {reward}: "
                        "give one of them")
    return rewards[0], (rewards[0], *[n for n in names if n == SECONDS])


def positive_number(flag: str, value: Any) -> float:
    """A finite number > 0 (a budget, a margin), else a one-line OvssError naming ``flag``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OvssError(f"{flag} {value!r}: must be a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise OvssError(f"{flag} {value}: must be a positive number")
    return v


def feasible(point: Mapping[str, Any], budget: float | None) -> bool:
    """Within the budget (always, without one; never, with one and no measured cost)."""
    if budget is None:
        return True
    s = point.get("seconds")
    return s is not None and float(s) <= budget


def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """``a`` is at least as good as ``b`` in score and in seconds, and better in one."""
    sa, sb, ta, tb = float(a["score"]), float(b["score"]), float(a["seconds"]), float(b["seconds"])
    return sa >= sb and ta <= tb and (sa > sb or ta < tb)


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the points no other point dominates, fastest first (ties: higher score
    first). Points with equal score and seconds are all on the front. O(n log n): sorted by
    seconds, a point is on the front when its score beats every faster point's."""
    order = sorted(range(len(points)),
                   key=lambda i: (float(points[i]["seconds"]), -float(points[i]["score"])))
    front: list[int] = []
    best = -math.inf          # best score among strictly faster points (and equal ones kept)
    last: tuple[float, float] | None = None
    for i in order:
        s, t = float(points[i]["score"]), float(points[i]["seconds"])
        if last is not None and (t, s) == last:    # a twin of a front point
            front.append(i)
            continue
        if s > best:
            front.append(i)
            best, last = s, (t, s)
    return front


def best_point(points: Sequence[Mapping[str, Any]], budget: float | None = None
               ) -> Mapping[str, Any] | None:
    """The highest score among the feasible points; ties go to the faster one (so the best is
    on the front). None when no point is feasible."""
    ok = [p for p in points if feasible(p, budget)]
    if not ok:
        return None
    return max(ok, key=lambda p: (float(p["score"]), -float(p.get("seconds") or 0.0)))


def fastest_within(points: Sequence[Mapping[str, Any]], delta: float,
                   budget: float | None = None) -> Mapping[str, Any] | None:
    """The fastest feasible point whose score is within ``delta`` of the best feasible one
    (ties: the higher score). None when no point is feasible. (A point no slower than the
    feasible best is feasible itself, so only the best needs the budget.)"""
    best = best_point(points, budget)
    if best is None:
        return None
    near = [p for p in points if p.get("seconds") is not None
            and float(p["score"]) >= float(best["score"]) - delta]
    return min(near, key=lambda p: (float(p["seconds"]), -float(p["score"])), default=best)


def parse_pick(text: str) -> tuple[str, float | None]:
    """``--pick`` of ``search.export``: ``best``, ``fastest-within=D`` or ``budget=B``."""
    if text == "best":
        return "best", None
    name, sep, value = text.partition("=")
    if sep and name in ("fastest-within", "budget"):
        return name, positive_number(f"--pick {name}", value)
    raise OvssError(f"--pick {text!r}: choose best, fastest-within=D (a score margin, e.g. "
                    "0.01) or budget=B (seconds per image)")


def pick(points: Sequence[Mapping[str, Any]], rule: str, value: float | None
         ) -> Mapping[str, Any]:
    """The point of ``rule`` (:func:`parse_pick`) among ``points`` (a front); one-line
    OvssError naming the fastest point when a budget leaves none."""
    if rule == "best":
        chosen = best_point(points)
    elif rule == "fastest-within":
        chosen = fastest_within(points, float(value))
    else:
        chosen = best_point(points, value)
        if chosen is None:
            fast = min(points, key=lambda p: float(p["seconds"]))
            raise OvssError(f"--pick budget={value:g}: no config of the front runs within "
                            f"{value:g} s per image; the fastest takes "
                            f"{float(fast['seconds']):.4g} s ({fast.get('params')})")
    if chosen is None:
        raise OvssError("the front is empty: no trial was scored on every tuning image")
    return chosen


def budget_constraint(seconds: float, budget: float) -> float:
    """The value Optuna's ``Trial.set_constraint(BUDGET_CONSTRAINT, v)`` gets: ``seconds -
    budget``, feasible when 0 or less (Optuna 5 reads a trial's constraints in TPE, NSGA-II and
    ``plot_pareto_front``; its ``constraints_func`` is deprecated)."""
    return float(seconds) - float(budget)


class Patience:
    """Stop after ``trials`` trials in a row that bring no improvement beyond ``margin``.

    A trial improves when it is scored on every tuning image, is within the budget, and no
    earlier kept trial is within ``margin`` of its score at no more seconds (for a search
    without the seconds objective: no earlier score is within ``margin`` of it, that is, it
    beats the best by more than ``margin``). Pruned, failed and over-budget trials do not
    improve."""

    def __init__(self, trials: int, margin: float, budget: float | None = None,
                 use_seconds: bool = False):
        self.trials, self.margin = int(trials), float(margin)
        self.budget, self.use_seconds = budget, use_seconds
        self.kept: list[tuple[float, float]] = []     # (score, seconds) of improving trials
        self.seen = 0           # trials observed
        self.since = 0          # trials since the last improvement

    def improves(self, score: float | None, seconds: float | None) -> bool:
        if score is None or not math.isfinite(score):
            return False
        if not feasible({"seconds": seconds}, self.budget):
            return False
        t = float(seconds) if (self.use_seconds and seconds is not None) else 0.0
        return not any(s >= score - self.margin and (not self.use_seconds or u <= t)
                       for s, u in self.kept)

    def observe(self, score: float | None, seconds: float | None) -> bool:
        """Count one finished trial; True when it improved."""
        self.seen += 1
        better = self.improves(score, seconds)
        if better:
            t = float(seconds) if (self.use_seconds and seconds is not None) else 0.0
            self.kept.append((float(score), t))
            self.since = 0
        else:
            self.since += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.since >= self.trials

    def reason(self) -> str:
        return (f"patience: {self.since} trials in a row brought no improvement beyond "
                f"{self.margin:g} (after {self.seen} trials)")


def front_csv(table: Sequence[Mapping[str, Any]]) -> str:
    """The front table (rows of trial, score, seconds_per_image, knobs, run_id) as CSV; floats
    written in full (``repr``), so :func:`read_front` gets the very values back."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()


def read_front(text: str, space: Mapping[str, Any], reward: str) -> list[dict[str, Any]]:
    """``pareto_front.csv`` back as points: ``score``, ``seconds``, ``params`` (the searched
    knobs, typed by ``space``), ``run_id`` and ``trial``."""
    from search.core.space import parse_value

    out = []
    for row in csv.DictReader(io.StringIO(text)):
        out.append({"score": float(row[reward]), "seconds": float(row["seconds_per_image"]),
                    "params": {k: parse_value(row[k], p) for k, p in space.items() if k in row},
                    "run_id": row.get("run_id", ""), "trial": row.get("trial", "")})
    return out
