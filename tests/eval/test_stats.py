"""Win/tie/loss, bootstrap CIs and p-values on data whose answer is known."""

import numpy as np
import pytest
from scipy import stats

from alignkit.eval.stats import bootstrap_mean_ci, paired_comparison, summarize


def test_identical_scores_are_all_ties():
    x = np.linspace(-1, 1, 50)
    c = paired_comparison(x, x.copy())
    assert (c["wins"], c["ties"], c["losses"]) == (0, 50, 0)
    assert c["win_rate"] == c["ci_low"] == c["ci_high"] == 0.5
    assert c["p_value"] == c["p_value_wilcoxon"] == 1.0
    assert c["gain"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_two_draws_from_one_distribution_are_not_significant():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=200), rng.normal(size=200)
    c = paired_comparison(a, b)
    assert c["ci_low"] < 0.5 < c["ci_high"]
    assert c["p_value"] > 0.05 and c["p_value_wilcoxon"] > 0.05
    assert c["gain"]["ci_low"] < 0 < c["gain"]["ci_high"]


def test_a_real_gain_is_significant_and_p_matches_the_binomial_test():
    rng = np.random.default_rng(0)
    base = rng.normal(size=100)
    better = base + 0.5 + 0.5 * rng.normal(size=100)
    c = paired_comparison(better, base)
    assert c["ci_low"] > 0.5 and c["p_value"] < 1e-3
    assert c["win_rate"] == pytest.approx(c["wins"] / 100)
    assert c["p_value"] == pytest.approx(stats.binomtest(c["wins"], 100, 0.5).pvalue)
    assert c["gain"]["ci_low"] > 0


def test_ties_count_half_and_float_noise_is_a_tie():
    model = np.array([1.0, 2.0, 3.0, 4.0 + 1e-9])
    against = np.array([0.0, 2.0, 5.0, 4.0])
    c = paired_comparison(model, against)
    assert (c["wins"], c["ties"], c["losses"]) == (1, 2, 1)
    assert c["win_rate"] == 0.5


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    lo_s, hi_s = bootstrap_mean_ci(small)
    lo_l, hi_l = bootstrap_mean_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < 1.0 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5
    # about 1.96 standard errors on each side
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * large.std() / np.sqrt(3000), rel=0.15)


def test_summarize_uses_prompt_means_for_the_ci():
    per_sample = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # every prompt's mean is 0.5
    s = summarize(per_sample)
    assert s["mean"] == 0.5 and s["ci_low"] == s["ci_high"] == 0.5
    assert s["min"] == 0.0 and s["max"] == 1.0 and s["p50"] == 0.5


def test_prompts_a_reward_does_not_apply_to_are_left_out():
    model = np.array([1.0, np.nan, 3.0, 0.0])
    against = np.array([0.0, 5.0, np.nan, 1.0])
    c = paired_comparison(model, against)
    assert (c["n_prompts"], c["wins"], c["losses"]) == (2, 1, 1)
    s = summarize(np.array([[1.0, np.nan], [np.nan, np.nan], [3.0, 5.0]]))
    assert s["mean"] == 3.0 and s["ci_low"] >= 1.0 and s["ci_high"] <= 4.0
