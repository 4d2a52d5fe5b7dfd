"""Bootstrap confidence intervals and pairwise win rates for evaluation reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_ranks", "bootstrap_ci", "mean_with_ci", "spearman", "win_rate"]


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling items with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_with_ci(name: str, values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """`{name, name_ci_low, name_ci_high}` for a list of per-item values."""
    low, high = bootstrap_ci(values, seed=seed)
    return {
        name: float(np.mean(values)) if len(values) else float("nan"),
        f"{name}_ci_low": low,
        f"{name}_ci_high": high,
    }


def win_rate(scores: Sequence[float], reference_scores: Sequence[float], tie_margin: float = 1e-6) -> list[float]:
    """Per-item outcome against the reference on the same prompt: 1 win, 0.5 tie, 0 loss."""
    if len(scores) != len(reference_scores):
        raise ValueError(f"win rate needs paired scores, got {len(scores)} and {len(reference_scores)}")
    return [1.0 if s > r + tie_margin else 0.0 if s < r - tie_margin else 0.5 for s, r in zip(scores, reference_scores)]


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson r of the average ranks, so ties are handled);
    0.0 when either side is constant (no monotone relation can be measured)."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.size < 2 or ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])
