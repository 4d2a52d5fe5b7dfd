"""Bootstrap confidence intervals and pairwise win rates for evaluation reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "mean_with_ci", "win_rate"]


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
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
    return {name: float(np.mean(values)) if len(values) else float("nan"),
            f"{name}_ci_low": low, f"{name}_ci_high": high}


def win_rate(scores: Sequence[float], reference_scores: Sequence[float], tie_margin: float = 1e-6) -> list[float]:
    """Per-item outcome against the reference on the same prompt: 1 win, 0.5 tie, 0 loss."""
    if len(scores) != len(reference_scores):
        raise ValueError(f"win rate needs paired scores, got {len(scores)} and {len(reference_scores)}")
    return [1.0 if s > r + tie_margin else 0.0 if s < r - tie_margin else 0.5
            for s, r in zip(scores, reference_scores)]
