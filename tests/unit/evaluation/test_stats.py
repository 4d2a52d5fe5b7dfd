import numpy as np
import pytest

from alignkit.evaluation.stats import bootstrap_ci, mean_with_ci, win_rate


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.2, 50), rng.normal(0.5, 0.2, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    # for a normal mean the 95% interval is about +-1.96 standard errors
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * large.std() / np.sqrt(large.size), rel=0.15)


def test_constant_values_have_a_point_interval():
    assert mean_with_ci("x", [0.25] * 10) == {"x": 0.25, "x_ci_low": 0.25, "x_ci_high": 0.25}


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_spearman_by_hand_with_ties():
    from alignkit.evaluation.stats import average_ranks, spearman

    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert abs(spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12
    # Ties: ranks [1.5, 1.5, 3.5, 3.5] and [1, 2.5, 2.5, 4]; centred dot 3 / (2 * sqrt(4.5)) = 0.707107
    assert abs(spearman([0, 0, 1, 1], [0, 1, 1, 2]) - 0.7071067811865476) < 1e-12
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0  # a constant side: no relation measurable
