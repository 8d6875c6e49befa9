"""Bootstrap intervals and paired differences of the held-out sample rewards (hand-checkable values)."""

import math

import pytest

from srppo_trl.evaluation.sample_rewards import bootstrap_ci, paired_difference


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_ci([2.5] * 10) == (2.5, 2.5)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_data():
    small = bootstrap_ci([0.0, 1.0] * 5, seed=0)
    large = bootstrap_ci([0.0, 1.0] * 500, seed=0)
    assert small[0] < 0.5 < small[1]
    assert large[0] < 0.5 < large[1]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5  # ~ 1 / sqrt(n): 10x the data, ~1/10 the width


def test_bootstrap_of_nothing_is_nan():
    low, high = bootstrap_ci([])
    assert math.isnan(low) and math.isnan(high)


def test_paired_difference_is_per_prompt():
    # The same +1 shift on every prompt: the interval is exactly [1, 1] although the values vary a lot.
    before = [0.0, 10.0, -5.0, 3.0]
    after = [1.0, 11.0, -4.0, 4.0]
    diff = paired_difference(after, before)
    assert diff["mean"] == pytest.approx(1.0) and diff["ci95"] == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(after, before[:2])
