"""Phase 1 of a cost-aware search (docs/cost.md): ``--objectives``, ``--max-seconds-per-image``,
``--fastest-within``, ``--patience`` and ``--warm-start`` validated before Ray, as one
:class:`CostPlan` the later phases read (``plan.cost``)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from methods.base import OvssError


@dataclass
class CostPlan:
    objectives: tuple[str, ...]        # the reward first, then "seconds" when it is one
    budget: float | None = None        # --max-seconds-per-image
    fastest_within: float = 0.01       # the summary's score margin for the fastest config
    patience: int | None = None        # --patience N
    margin: float = 0.001              # --patience-margin
    warm: Any = None                   # search.engine.warmstart.WarmStart, or None
    tracker: Any = None                # the searcher's search.core.front.Patience (this driver)
    device_kind: str | None = None     # where the cost probe timed extract (phase 4b)

    @property
    def seconds(self) -> bool:
        """Seconds per image is an objective (a two-objective search: no ASHA)."""
        from search.core.front import SECONDS

        return SECONDS in self.objectives

    @property
    def measure(self) -> bool:
        """The search measures each config's seconds per image (an objective or a budget)."""
        return self.seconds or self.budget is not None


def reward_and_objectives(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    """The reward (``--reward``, else the one ``--objectives`` names, else miou) and the
    objectives; sets ``args.reward``."""
    from search.core.front import parse_objectives

    reward, objectives = parse_objectives(getattr(args, "objectives", None), args.reward)
    args.reward = reward
    return reward, objectives


def _non_negative(flag: str, v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise OvssError(f"{flag} {v:g}: must be a finite number, 0 or more")
    return float(v)


def cost_plan(args: argparse.Namespace, objectives: tuple[str, ...], resolved,
              tracking_uri: str, rerank_top: int) -> CostPlan:
    """Every cost-aware flag checked (one OvssError line naming it), the warm start read."""
    from search.core.cost import cost_conf
    from search.core.front import positive_number

    conf = cost_conf()
    budget = getattr(args, "max_seconds_per_image", None)
    if budget is not None:
        budget = positive_number("--max-seconds-per-image", budget)
    within = getattr(args, "fastest_within", None)
    within = conf["fastest_within"] if within is None else \
        _non_negative("--fastest-within", within)
    patience = getattr(args, "patience", None)
    if patience is not None and patience < 1:
        raise OvssError(f"--patience {patience}: must be at least 1 (trials without "
                        "improvement before the search stops)")
    margin = getattr(args, "patience_margin", None)
    margin = conf["patience_margin"] if margin is None else \
        _non_negative("--patience-margin", margin)
    plan = CostPlan(objectives, budget, float(within), patience, float(margin))
    if plan.measure and rerank_top:
        raise OvssError("--rerank-top with a cost objective or budget: trials run the proxy "
                        "pipeline, whose seconds are not the full pipeline's; drop one of them")
    ref = getattr(args, "warm_start", None)
    if ref:
        from search.engine.warmstart import warm_start

        top = getattr(args, "warm_start_top", None)
        plan.warm = warm_start(ref, resolved.method, resolved.space, resolved.defaults,
                               tracking_uri, int(conf["warm_start_top"] if top is None
                                                 else top))
    return plan
