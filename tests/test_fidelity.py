"""The fidelity report (rewards/fidelity.py) against scipy and direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, rankdata, spearmanr

from rewards.fidelity import fidelity_report

KEYS = {"fidelity_spearman", "fidelity_kendall", "fidelity_regret_miou",
        "fidelity_best_reward_miou", "fidelity_best_miou", "fidelity_trials"}


def test_correlations_and_regret_against_scipy_and_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    mious = rng.uniform(0.2, 0.6, 25)
    rewards = mious + rng.normal(0, 0.08, 25)            # a noisy reward
    out = fidelity_report(rewards.tolist(), mious.tolist(), tmp_path / "plots" / "f.png")
    assert set(out) == KEYS and out["fidelity_trials"] == 25
    assert out["fidelity_spearman"] == pytest.approx(spearmanr(rewards, mious).statistic)
    assert out["fidelity_kendall"] == pytest.approx(kendalltau(rewards, mious).statistic)
    # Spearman = Pearson of ranks, Kendall (no ties) = (concordant - discordant) / pairs
    rr, rm = rankdata(rewards), rankdata(mious)
    assert out["fidelity_spearman"] == pytest.approx(np.corrcoef(rr, rm)[0, 1])
    pairs = [(i, j) for i in range(25) for j in range(i + 1, 25)]
    sign = sum(np.sign(rewards[i] - rewards[j]) * np.sign(mious[i] - mious[j]) for i, j in pairs)
    assert out["fidelity_kendall"] == pytest.approx(sign / len(pairs))
    picked = mious[int(np.argmax(rewards))]
    assert out["fidelity_best_miou"] == mious.max()
    assert out["fidelity_best_reward_miou"] == picked
    assert out["fidelity_regret_miou"] == pytest.approx(mious.max() - picked)
    assert out["fidelity_regret_miou"] > 0                 # the noise makes the reward miss
    png = (tmp_path / "plots" / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_ties_go_to_the_earliest_trial():
    rewards = [0.5, 0.9, 0.9, 0.1]                         # trials 1 and 2 tie on the reward
    mious = [0.40, 0.30, 0.45, 0.45]                       # trials 2 and 3 tie on mIoU
    out = fidelity_report(rewards, mious)
    assert out["fidelity_best_reward_miou"] == 0.30        # trial 1, not 2
    assert out["fidelity_best_miou"] == 0.45
    assert out["fidelity_regret_miou"] == pytest.approx(0.15)
    assert out["fidelity_kendall"] == pytest.approx(kendalltau(rewards, mious).statistic)


def test_a_reward_that_ranks_like_miou_has_no_regret():
    mious = [0.1, 0.5, 0.3, 0.2]
    out = fidelity_report([m ** 3 for m in mious], mious)  # monotone: same ranking
    assert out["fidelity_spearman"] == pytest.approx(1.0)
    assert out["fidelity_kendall"] == pytest.approx(1.0)
    assert out["fidelity_regret_miou"] == 0.0


@pytest.mark.parametrize("rewards, mious", [
    ([0.2, 0.7], [0.3, 0.1]),                              # fewer than 3 trials
    ([0.4, 0.4, 0.4, 0.4], [0.1, 0.2, 0.3, 0.4]),          # constant reward
    ([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]),                    # constant mIoU
])
def test_undefined_correlations_are_nan_but_regret_is_not(rewards, mious, tmp_path):
    out = fidelity_report(rewards, mious, tmp_path / "f.png")
    assert math.isnan(out["fidelity_spearman"]) and math.isnan(out["fidelity_kendall"])
    picked = mious[rewards.index(max(rewards))]
    assert out["fidelity_regret_miou"] == pytest.approx(max(mious) - picked)
    assert (tmp_path / "f.png").is_file()


def test_non_finite_trials_are_dropped_and_no_trials_give_nan(tmp_path):
    out = fidelity_report([0.3, float("nan"), 0.9, 0.5, 0.1],
                          [0.2, 0.9, float("inf"), 0.4, 0.1])
    assert out["fidelity_trials"] == 3
    assert out["fidelity_best_miou"] == 0.4 and out["fidelity_regret_miou"] == 0.0
    empty = fidelity_report([], [], tmp_path / "none.png")
    assert empty["fidelity_trials"] == 0
    assert all(math.isnan(v) for k, v in empty.items() if k != "fidelity_trials")
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match="3 rewards but 2"):
        fidelity_report([1, 2, 3], [1, 2])
