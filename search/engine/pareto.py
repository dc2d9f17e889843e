"""Phase 7 of a cost-aware search (docs/cost.md), where users look: the Pareto front of quality
against seconds per image on the parent run (``pareto_front.csv``, Optuna's
``plots/pareto_front.png``, the front's trials tagged ``ovss_pareto=1``, ``pareto/*`` metrics),
the budget check (a search whose budget no config meets ends FAILED naming the cheapest
config), parameter importances as numbers (every search), why the search stopped, and the
summary lines."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from methods.base import OvssError
from methods.io import atomic_write
from search.core.front import FRONT_CSV, front_csv


def full_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows scored on every tuning image (the most images any row saw) with a cost."""
    if not rows:
        return []
    top = max(r["images"] for r in rows)
    return [r for r in rows if r["images"] == top and r.get("seconds") is not None]


def front_table(plan, rows: Sequence[Mapping[str, Any]], callback) -> list[dict[str, Any]]:
    """One row per front member, fastest first: trial number, score, seconds per image,
    within the budget, the searched knobs and the child run id (what ``search.export --pick``
    reads back)."""
    from search.core.front import feasible, pareto_front

    full = full_rows(rows)
    budget = plan.cost.budget
    out = []
    for i in pareto_front(full):
        r = full[i]
        tid = r["trial_id"]
        out.append({"trial": callback.numbers.get(tid, ""), plan.reward["name"]: r["score"],
                    "seconds_per_image": r["seconds"],
                    **({"within_budget": feasible(r, budget)} if budget is not None else {}),
                    **{k: r["params"].get(k) for k in plan.resolved.space},
                    "run_id": callback.runs.get(tid, "")})
    return out


def _study(plan, full: Sequence[Mapping[str, Any]]):
    """The fully scored trials as an in-memory two-objective Optuna study (score up, seconds
    down), each with its budget constraint when the search has a budget."""
    import optuna

    from search.core.front import BUDGET_CONSTRAINT, budget_constraint
    from search.core.space import optuna_space

    dists = optuna_space(plan.resolved.space)
    budget = plan.cost.budget
    study = optuna.create_study(directions=["maximize", "minimize"])
    for r in full:
        if set(r["params"]) == set(dists):
            study.add_trial(optuna.trial.create_trial(
                params=r["params"], distributions=dists, values=[r["score"], r["seconds"]],
                constraints=({BUDGET_CONSTRAINT: budget_constraint(r["seconds"], budget)}
                             if budget is not None else None)))
    return study


def _plot(plan, full, path: Path) -> Path | None:
    """Optuna's ``plot_pareto_front`` (matplotlib) of every full trial, the budget's infeasible
    trials greyed out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = ovm.plot_pareto_front(
                _study(plan, full), target_names=[plan.reward["name"], "seconds per image"],
                include_dominated_trials=True)
        atomic_write(path, lambda f: ax.figure.savefig(f, format="png", dpi=80,
                                                       bbox_inches="tight"))
        plt.close(ax.figure)
        return path
    except Exception as e:  # noqa: BLE001 - a plot never fails a search
        print(f"plot pareto_front skipped: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        return None


def log_front(client, parent_id: str, plan, rows, callback) -> list[dict[str, Any]]:
    """The front on the parent run (table, plot, ``pareto/size``) and its trials tagged
    ``ovss_pareto=1``; returns the table (empty when no trial was fully scored)."""
    from search.record import tracking

    full = full_rows(rows)
    if not full:
        return []
    table = front_table(plan, rows, callback)
    with tempfile.TemporaryDirectory() as d:
        atomic_write(Path(d) / FRONT_CSV, front_csv(table))
        client.log_artifact(parent_id, str(Path(d) / FRONT_CSV))
        png = _plot(plan, full, Path(d) / "pareto_front.png")
        if png is not None:
            client.log_artifact(parent_id, str(png), "plots")
    for row in table:
        if row["run_id"]:
            client.set_tag(row["run_id"], "ovss_pareto", "1")
    tracking.log_metrics(client, parent_id, {"pareto/size": len(table),
                                             "pareto/trials": len(full)}, 0)
    return table


def check_budget(client, parent_id: str, plan, rows, callback) -> None:
    """With a budget that no fully scored trial meets: tag the parent run why and raise the
    one-line OvssError naming the cheapest config found (the run then ends FAILED)."""
    from search.core.console import score_text
    from search.core.front import best_point

    budget = plan.cost.budget
    if budget is None or best_point(full_rows(rows), budget) is not None:
        return
    timed = [r for r in rows if r.get("seconds") is not None]
    cheapest = min(timed, key=lambda r: r["seconds"]) if timed else None
    what = (f"the cheapest config found, trial {callback.numbers.get(cheapest['trial_id'], '?')}"
            f", takes {cheapest['seconds']:.4g} s per image "
            f"({score_text(plan.reward['name'], cheapest['score'])} on {cheapest['images']} "
            f"images) with {cheapest['params']}" if cheapest else "no trial was timed")
    line = (f"no config meets --max-seconds-per-image {budget:g}: {what}; raise the budget "
            "or search cheaper settings")
    client.set_tag(parent_id, "ovss_stop_reason", f"budget: {line}")
    raise OvssError(line)


def log_importances(client, parent_id: str, plan, rows) -> dict[str, float]:
    """``importance/<knob>`` (the score's fANOVA importances over the trials scored on every
    image) and, when cost was measured, ``importance_seconds/<knob>``, as parent metrics."""
    import warnings

    import optuna

    from search.core.space import optuna_space
    from search.record import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    top = max((r["images"] for r in rows), default=0)
    full = [r for r in rows if r["images"] == top]
    dists = optuna_space(plan.resolved.space)
    out: dict[str, float] = {}
    targets = [("importance", "score")]
    if all(r.get("seconds") is not None for r in full):
        targets.append(("importance_seconds", "seconds"))
    for prefix, key in targets:
        study = optuna.create_study(direction="maximize")
        for r in full:
            if set(r["params"]) == set(dists):
                study.add_trial(optuna.trial.create_trial(params=r["params"],
                                                          distributions=dists, value=r[key]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study)
        except Exception as e:  # noqa: BLE001 - e.g. fewer than two distinct trials
            print(f"{prefix} skipped: {str(e).splitlines()[0] if str(e) else e!r}",
                  file=sys.stderr)
            continue
        out.update({f"{prefix}/{k}": float(v) for k, v in imp.items()})
    if out:
        tracking.log_metrics(client, parent_id, out, 0)
    return out


def stop_reason(plan, trials: int) -> str:
    """Why the search stopped after ``trials`` trials: patience, or every trial ran."""
    cost = getattr(plan, "cost", None)
    tracker = getattr(cost, "tracker", None)
    if tracker is not None and tracker.exhausted:
        return tracker.reason()
    if cost is not None and cost.patience and trials < plan.num_samples:
        return (f"patience: {cost.patience} trials in a row brought no improvement beyond "
                f"{cost.margin:g} (after {trials} trials)")
    return f"num_samples: all {trials} trials ran"


def after_tuning(client, parent_id: str, plan, results, callback) -> None:
    """Between tuning and the outputs: why the search stopped (tag ``ovss_stop_reason``,
    metric ``stopped_after_trials``), the importances, and in a cost-aware search the front and
    the budget check (which raises when no config meets it)."""
    from search.engine.tuning import best_result
    from search.record import tracking

    _, rows = best_result(results, list(plan.resolved.space))
    trials = len(list(results))
    client.set_tag(parent_id, "ovss_stop_reason", stop_reason(plan, trials))
    tracking.log_metrics(client, parent_id, {"stopped_after_trials": trials}, 0)
    log_importances(client, parent_id, plan, rows)
    if getattr(plan, "cost", None) is not None and plan.cost.measure:
        log_front(client, parent_id, plan, rows, callback)
        check_budget(client, parent_id, plan, rows, callback)


def front_text(plan, rows, callback) -> str:
    """The front as the command line prints it: a Markdown table, fastest first, the score in
    percent (:mod:`search.core.console`)."""
    from search.core.console import score_name

    table = front_table(plan, rows, callback)
    if not table:
        return ""
    reward = plan.reward["name"]

    def cell(k: str, v: Any) -> str:
        if k == reward:
            return f"{100 * v:.2f}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = [k for k in table[0] if k != "run_id"]
    head = [f"{score_name(reward)} (%)" if k == reward else k for k in cols]
    lines = [f"Pareto front ({len(table)} of {len(full_rows(rows))} trials scored on every "
             f"image; {score_name(reward)} up, seconds per image down):",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in cols) + " |" for r in table]
    return "\n".join(lines)


def summary(plan, best: Mapping[str, Any], rows, callback) -> list[str]:
    """The best config, and in a cost-aware search the front's table, the best config's seconds
    and the fastest config within ``--fastest-within`` of it: the lines the CLI prints."""
    from search.core.console import percent, score_name, score_text
    from search.core.front import fastest_within

    reward, cost = plan.reward["name"], getattr(plan, "cost", None)
    if best.get("seconds") is None or cost is None:
        return [f"best {score_text(reward, best['score'])} with {best['params']}"]
    n = callback.numbers.get(best["trial_id"], "?")
    lines = [front_text(plan, rows, callback),
             f"best {score_text(reward, best['score'])} at {best['seconds']:.4g} s/image "
             f"(trial {n}) with {best['params']}"
             + (f" (within --max-seconds-per-image {cost.budget:g})" if cost.budget else "")]
    fast = fastest_within(full_rows(rows), cost.fastest_within, cost.budget)
    if fast is not None:
        same = fast["trial_id"] == best["trial_id"]
        lines.append(f"fastest within {percent(cost.fastest_within)} {score_name(reward)} of "
                     "it: " + ("the best config itself" if same else
                               f"{score_text(reward, fast['score'])} at {fast['seconds']:.4g} "
                               f"s/image (trial {callback.numbers.get(fast['trial_id'], '?')}) "
                               f"with {fast['params']}"))
    return [x for x in lines if x]
