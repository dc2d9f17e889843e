"""How well a label-free reward ranks trials the way mIoU does (the fidelity report).

Given per-trial ``(reward, mIoU)`` pairs of one search (same images for every trial):

- ``fidelity_spearman`` / ``fidelity_kendall``: rank correlations (scipy; Kendall's tau-b, which
  handles ties). NaN when fewer than 3 trials or when either column is constant: a correlation
  is undefined (or meaningless) there, and NaN says so rather than a made-up 0.
- ``fidelity_best_miou``: mIoU of the mIoU-best trial (the oracle's pick).
- ``fidelity_best_reward_miou``: mIoU of the reward-best trial (what the label-free search picks).
- ``fidelity_regret_miou``: their difference, >= 0; 0 when the reward picks an mIoU-best trial.
  Ties in either column go to the earliest trial (the search's trial order).
- ``fidelity_trials``: the number of trials used. Pairs with a non-finite value (a failed or
  pruned trial) are left out.

No Ray, Optuna or MLflow here; ``search.engine.outputs`` logs the dict and the PNG on the parent
run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def first_argmax(values: np.ndarray) -> int:
    """Index of the largest value, the earliest one on ties. values: [N] float, N >= 1."""
    return int(np.flatnonzero(values == values.max())[0])


def rank_correlations(rewards: np.ndarray, mious: np.ndarray) -> tuple[float, float]:
    """(Spearman rho, Kendall tau-b) of two [N] float arrays; NaN for N < 3 or a constant one."""
    if len(rewards) < 3 or np.ptp(rewards) == 0 or np.ptp(mious) == 0:
        return math.nan, math.nan
    from scipy.stats import kendalltau, spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(rewards, mious).statistic
        tau = kendalltau(rewards, mious).statistic
    return float(rho), float(tau)


def undefined_reason(rewards: Sequence[float], mious: Sequence[float],
                     names: tuple[str, str] = ("the reward", "mIoU")) -> str | None:
    """Why :func:`rank_correlations` of these pairs is undefined, in one line, or None when it is
    defined. Pairs with a non-finite value are left out first, as in :func:`fidelity_report`.
    ``names``: what the two columns are, for the sentence. Values are printed in percent."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    m = np.asarray(mious, dtype=np.float64).reshape(-1)
    ok = np.isfinite(r) & np.isfinite(m)
    r, m = r[ok], m[ok]
    if len(r) < 3:
        return f"{len(r)} trial(s) with both scores; a rank correlation needs at least 3"
    for name, col in zip(names, (r, m)):
        if np.ptp(col) == 0:
            return (f"{name} is the same for all {len(col)} trials ({100 * col[0]:.2f} %): there "
                    "is no ranking to compare")
    return None


def selection_regret(rewards: np.ndarray, mious: np.ndarray) -> tuple[float, float, float]:
    """(regret, mIoU of the reward-best trial, best mIoU) for [N] float arrays, N >= 1."""
    best = float(mious[first_argmax(mious)])
    picked = float(mious[first_argmax(rewards)])
    return best - picked, picked, best


def fidelity_report(rewards: Sequence[float], mious: Sequence[float],
                    png_path: str | Path | None = None) -> dict[str, float]:
    """The fidelity metrics (module docstring) of per-trial rewards and mIoUs, in trial order.

    rewards, mious: one value per trial, same length. With ``png_path``, a scatter plot of
    mIoU against reward (the reward-best and mIoU-best trials marked) is written there as PNG
    when at least one trial is usable. Returns floats (NaN where undefined).
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    m = np.asarray(mious, dtype=np.float64).reshape(-1)
    if len(r) != len(m):
        raise ValueError(f"{len(r)} rewards but {len(m)} mIoU values")
    ok = np.isfinite(r) & np.isfinite(m)
    r, m = r[ok], m[ok]
    out = {"fidelity_spearman": math.nan, "fidelity_kendall": math.nan,
           "fidelity_regret_miou": math.nan, "fidelity_best_reward_miou": math.nan,
           "fidelity_best_miou": math.nan, "fidelity_trials": float(len(r))}
    if len(r) == 0:
        return out
    out["fidelity_spearman"], out["fidelity_kendall"] = rank_correlations(r, m)
    (out["fidelity_regret_miou"], out["fidelity_best_reward_miou"],
     out["fidelity_best_miou"]) = selection_regret(r, m)
    if png_path is not None:
        scatter_plot(r, m, out, Path(png_path))
    return out


def scatter_plot(rewards: np.ndarray, mious: np.ndarray, report: dict[str, float],
                 path: Path) -> Path:
    """mIoU (y) against reward (x), one dot per trial; writes a PNG (Agg backend) to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    ax.scatter(rewards, mious, s=18, color="tab:blue", label="trials")
    i_r, i_m = first_argmax(rewards), first_argmax(mious)
    ax.scatter([rewards[i_r]], [mious[i_r]], s=80, facecolors="none", edgecolors="tab:red",
               label="reward-best")
    ax.scatter([rewards[i_m]], [mious[i_m]], s=80, marker="*", color="tab:green",
               label="mIoU-best")
    ax.set_xlabel("reward")
    ax.set_ylabel("mIoU")
    ax.set_title(f"Spearman {report['fidelity_spearman']:.3f}, Kendall "
                 f"{report['fidelity_kendall']:.3f}, regret {report['fidelity_regret_miou']:.4f}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
