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


def fit_to_space(values: Mapping[str, Any], space: Mapping[str, SpaceParam],
                 fill: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A config of another search (``values``: typed, or MLflow's string params) as a point of
    ``space``: knobs the space lacks are dropped, a categorical value not among the choices
    is dropped, numbers are clipped to ``[low, high]`` and put on the step grid (ints rounded),
    and knobs the config lacks take ``fill``'s value (the paper defaults). Returns the point and
    one note per change (``"dropped foo (not searched here)"``, ``"clipped temp 1.5 -> 1.0"``)."""
    import math

    point: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in values.items():
        p = space.get(k)
        if p is None:
            notes.append(f"dropped {k} (not searched here)")
            continue
        if isinstance(p, CategoricalParam):
            match = [c for c in p.choices if c == v or str(c) == str(v)]
            if not match:
                notes.append(f"dropped {k}={v} (not one of {list(p.choices)})")
                continue
            point[k] = match[0]
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            notes.append(f"dropped {k}={v!r} (not a number)")
            continue
        if not math.isfinite(x):
            notes.append(f"dropped {k}={v} (not finite)")
            continue
        y = min(max(x, p.low), p.high)
        if p.step:      # onto the grid (rounded: low + k * step is not exact in floats)
            y = round(min(p.low + round((y - p.low) / p.step) * p.step, p.high), 12)
            y = y if abs(y - x) > 1e-9 else x
        y = int(round(y)) if isinstance(p, IntParam) else float(y)
        if y != x:
            notes.append(f"clipped {k} {v} -> {y} (space [{p.low}, {p.high}]"
                         + (f", step {p.step})" if p.step else ")"))
        point[k] = y
    for k in space:
        if k not in point:
            point[k] = fill[k]
            if not any(n.startswith(f"dropped {k}") for n in notes):
                notes.append(f"filled {k}={fill[k]} (the config has no {k})")
    return point, notes


def parse_value(text: str, p: SpaceParam) -> Any:
    """A knob value written as text (a CSV cell, an MLflow param) back in the space's type."""
    if isinstance(p, CategoricalParam):
        match = [c for c in p.choices if str(c) == str(text)]
        if not match:
            raise ValueError(f"{text!r} is not one of {list(p.choices)}")
        return match[0]
    return int(float(text)) if isinstance(p, IntParam) else float(text)
