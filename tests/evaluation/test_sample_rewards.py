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


def test_nested_bootstrap_on_hand_checkable_data():
    from srppo_trl.evaluation.sample_rewards import nested_bootstrap_ci

    assert nested_bootstrap_ci([[2.0, 2.0], [2.0]]) == (2.0, 2.0, 2.0)  # constant: no spread at all
    # Seeds [0, 0] and [1, 1]: prompts never vary within a seed, so a resample's mean is the share of seed-1 draws in
    # 2 draws: 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4. The 95% interval spans the extremes.
    mean, low, high = nested_bootstrap_ci([[0.0, 0.0], [1.0, 1.0]], num_resamples=4000)
    assert (mean, low, high) == (0.5, 0.0, 1.0)
    # One seed: the plain prompt bootstrap. The mean is the mean of the seeds' means, not of all values pooled.
    assert nested_bootstrap_ci([[0.0, 1.0]], num_resamples=4000)[1:] == (0.0, 1.0)
    assert nested_bootstrap_ci([[0.0], [1.0, 1.0, 1.0]])[0] == 0.5
    # Same seed, same result; more prompts per seed shrink the interval of a seed-free difference.
    noisy = [[float(i % 2) for i in range(10)]] * 3
    assert nested_bootstrap_ci(noisy, seed=3) == nested_bootstrap_ci(noisy, seed=3)
    wide, narrow = nested_bootstrap_ci(noisy), nested_bootstrap_ci([[float(i % 2) for i in range(400)]] * 3)
    assert wide[1] < narrow[1] <= 0.5 <= narrow[2] < wide[2]
    assert all(math.isnan(v) for v in nested_bootstrap_ci([]))
    with pytest.raises(ValueError, match="empty"):
        nested_bootstrap_ci([[1.0], []])
