"""Statistics for comparisons: bootstrap confidence intervals over prompts, paired win/tie/loss
with a sign test and a Wilcoxon signed-rank test, distribution summaries.

Prompts are the unit of resampling: the samples of one prompt are not independent of each
other, the prompts are. A model's score on a prompt is the mean over its samples there.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
PERCENTILES = (10, 25, 50, 75, 90)


def bootstrap_mean_ci(
    per_prompt: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``per_prompt`` (one value per prompt)."""
    values = np.asarray(per_prompt, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(per_sample: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean with a CI over prompts, spread and percentiles over samples. ``(prompts, n)``."""
    values = np.asarray(per_sample, dtype=float)
    known = ~np.isnan(values)  # a reward's None ("does not apply") is NaN here: left out
    flat = values[known]
    if flat.size == 0:
        return dict.fromkeys(
            ["mean", "std", "ci_low", "ci_high", "min", "max", *(f"p{q}" for q in PERCENTILES)],
            float("nan"),
        )
    prompt_means = np.array(
        [row[k].mean() for row, k in zip(values, known, strict=True) if k.any()]
    )
    low, high = bootstrap_mean_ci(prompt_means, resamples, seed)
    out = {
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "ci_low": low,
        "ci_high": high,
        "min": float(flat.min()),
        "max": float(flat.max()),
    }
    out.update(
        {
            f"p{q}": float(v)
            for q, v in zip(PERCENTILES, np.percentile(flat, PERCENTILES), strict=True)
        }
    )
    return out


def ties(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal up to float noise (a reward model scores the same text slightly differently in
    different batches)."""
    return np.isclose(a, b, rtol=1e-6, atol=1e-6)


def paired_comparison(
    model: np.ndarray, against: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """``model`` vs ``against``, one score per prompt each (the same prompts, in order; a
    prompt either has no score for, NaN, is left out and ``n_prompts`` says how many count).

    A prompt is a win, tie or loss for ``model``; the win rate counts a tie as half a win, with
    a bootstrap CI over prompts. ``p_value`` is the two-sided sign test on wins vs losses (ties
    dropped), ``p_value_wilcoxon`` the Wilcoxon signed-rank test on the score differences.
    """
    from scipy import stats  # ~0.6 s to import: only comparisons test significance

    model, against = np.asarray(model, dtype=float), np.asarray(against, dtype=float)
    if model.shape != against.shape:
        raise ValueError(f"{model.shape} scores vs {against.shape}")
    scored = ~(np.isnan(model) | np.isnan(against))  # prompts a reward does not apply to: left out
    model, against = model[scored], against[scored]
    diff = model - against
    tied = ties(model, against)
    outcome = np.where(tied, 0.5, (diff > 0).astype(float))
    wins, n_ties = int(((diff > 0) & ~tied).sum()), int(tied.sum())
    losses = int(diff.size - wins - n_ties)
    low, high = bootstrap_mean_ci(outcome, resamples, seed)
    gain_low, gain_high = bootstrap_mean_ci(diff, resamples, seed)
    sign_p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    decided = diff[~tied]
    wilcoxon_p = stats.wilcoxon(decided).pvalue if decided.size else 1.0
    return {
        "n_prompts": int(diff.size),
        "wins": wins,
        "ties": n_ties,
        "losses": losses,
        "win_rate": float(outcome.mean()),
        "ci_low": low,
        "ci_high": high,
        "p_value": float(sign_p),
        "p_value_wilcoxon": float(wilcoxon_p),
        "gain": {"mean": float(diff.mean()), "ci_low": gain_low, "ci_high": gain_high},
    }


def length_summary(lengths: np.ndarray) -> dict:
    values = np.asarray(lengths, dtype=float).ravel()
    out = {"mean": float(values.mean()), "max": float(values.max())}
    out.update(
        {
            f"p{q}": float(v)
            for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)
        }
    )
    return out
