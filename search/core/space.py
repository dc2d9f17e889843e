"""Search spaces: the YAML ``space`` block -> Optuna distributions, and back to full params.

Optuna is imported where a distribution is made, not at import: the benches (``sample_value``)
also run where only torch is installed (the GPU device check, docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from methods.spec import CategoricalParam, FloatParam, IntParam, SpaceParam

if TYPE_CHECKING:
    import optuna


def to_distribution(p: SpaceParam) -> optuna.distributions.BaseDistribution:
    import optuna

    if isinstance(p, IntParam):
        return optuna.distributions.IntDistribution(p.low, p.high, step=p.step, log=p.log)
    if isinstance(p, FloatParam):
        return optuna.distributions.FloatDistribution(p.low, p.high, step=p.step, log=p.log)
    if isinstance(p, CategoricalParam):
        return optuna.distributions.CategoricalDistribution(p.choices)
    raise TypeError(f"unknown space parameter {p!r}")


def optuna_space(space: Mapping[str, SpaceParam]) -> dict[str, Any]:
    return {k: to_distribution(p) for k, p in space.items()}


def full_params(defaults: Mapping[str, Any], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Every knob decode reads: the defaults with the sampled (searched) values on top."""
    out = dict(defaults)
    for k, v in sampled.items():
        if k in out:
            out[k] = v
    return out


def trial0(defaults: Mapping[str, Any], space: Mapping[str, SpaceParam]) -> dict[str, Any]:
    """The paper's values for the searched knobs: the point enqueued as the first trial."""
    return {k: defaults[k] for k in space}


def sample_value(p: SpaceParam, rng) -> Any:
    """One uniform random value of a space entry (``rng``: numpy Generator), honouring step and
    log: the benches draw their trials with it, without Optuna."""
    import math

    if isinstance(p, CategoricalParam):
        return p.choices[int(rng.integers(len(p.choices)))]
    if isinstance(p, FloatParam):
        if p.step:
            n = int(round((p.high - p.low) / p.step))
            return round(p.low + p.step * int(rng.integers(n + 1)), 10)
        if p.log:
            return float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
        return float(rng.uniform(p.low, p.high))
    if p.log:
        return int(round(math.exp(rng.uniform(math.log(p.low), math.log(p.high)))))
    return int(p.low + p.step * int(rng.integers((p.high - p.low) // p.step + 1)))
