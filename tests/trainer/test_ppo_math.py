"""Tests of the pure PPO math: hand-computed tensors for every function, and two GAE implementations that must agree."""

import math

import pytest
import torch

from srppo_trl.trainer import ppo_math
from srppo_trl.trainer.ppo_math import (
    KL_ESTIMATORS,
    compute_gae,
    entropy_from_logits,
    kl_k1,
    kl_k3,
    kl_per_token,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)


MASK_DTYPES = [torch.bool, torch.long, torch.float32]


def as_mask(rows, dtype):
    return torch.tensor(rows).to(dtype)


def prefix_masks(lengths, num_steps, dtype=torch.float32):
    """Right-padded response masks: row b has `lengths[b]` leading ones."""
    return (torch.arange(num_steps).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def test_module_imports_with_torch_alone():
    import subprocess
    import sys

    code = (
        "import sys; import srppo_trl.trainer.ppo_math; "
        "heavy = [m for m in ('transformers', 'trl', 'peft', 'accelerate') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------------------------
# masked_mean / masked_var / masked_whiten
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_mean_by_hand(mask_dtype):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = as_mask([[1, 1, 0], [1, 0, 0]], mask_dtype)
    # all: (1 + 2 + 4) / 3 = 7/3
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(7 / 3))
    # per row: (1 + 2) / 2 = 1.5 ; 4 / 1 = 4
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    # per column: (1 + 4) / 2 = 2.5 ; 2 / 1 = 2 ; empty column -> 0
    torch.testing.assert_close(masked_mean(values, mask, dim=0), torch.tensor([2.5, 2.0, 0.0]))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_mean_empty_mask_is_zero_with_finite_gradient(mask_dtype):
    values = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]], requires_grad=True)
    mask = as_mask([[0, 0], [0, 0]], mask_dtype)
    result = masked_mean(values, mask)
    assert result.item() == 0.0
    result.backward()
    assert torch.equal(values.grad, torch.zeros(2, 2))


def test_masked_mean_ignores_nonfinite_values_outside_mask_and_returns_float():
    values = torch.tensor([[2, 4, 10**6]])  # integer input
    mask = torch.tensor([[1, 1, 0]])
    result = masked_mean(values, mask)
    assert result.dtype == torch.float32
    assert result.item() == 3.0  # (2 + 4) / 2
    assert masked_mean(torch.tensor([[1.0, float("nan")]]), torch.tensor([[True, False]])).item() == 1.0


def test_masked_mean_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_var_by_hand(mask_dtype):
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = as_mask([1, 1, 1, 0], mask_dtype)
    # mean 2, squared deviations 1, 0, 1 -> biased 2/3, unbiased 2/2 = 1
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), torch.tensor(2 / 3))
    torch.testing.assert_close(masked_var(values, mask, unbiased=True), torch.tensor(1.0))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_torch_var_on_the_selected_values(unbiased):
    torch.manual_seed(0)
    values, mask = torch.randn(4, 9), torch.rand(4, 9) > 0.4
    expected = values[mask].var(unbiased=unbiased)
    torch.testing.assert_close(masked_var(values, mask, unbiased=unbiased), expected)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("mask_rows", [[[0, 0, 0]], [[0, 1, 0]]], ids=["empty", "single"])
def test_masked_var_of_zero_or_one_element_is_zero(unbiased, mask_rows):
    values = torch.tensor([[3.0, 5.0, float("inf")]])
    assert masked_var(values, torch.tensor(mask_rows), unbiased=unbiased).item() == 0.0


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_masked_whiten_by_hand(mask_dtype):
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = as_mask([[1, 1, 1, 0]], mask_dtype)
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) = -1, 0, 1 ; 0 outside the mask
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False adds the mean back: 1, 2, 3 ; still 0 outside the mask
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_statistics_on_random_values(shift_mean):
    torch.manual_seed(1)
    values = 5.0 + 3.0 * torch.randn(6, 20)
    mask = prefix_masks([20, 13, 7, 1, 0, 18], 20)
    whitened = masked_whiten(values, mask, shift_mean=shift_mean)
    expected_mean = 0.0 if shift_mean else masked_mean(values, mask).item()
    assert masked_mean(whitened, mask).item() == pytest.approx(expected_mean, abs=1e-5)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(whitened[mask == 0] == 0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_rows", [[[0, 1, 0]], [[0, 0, 0]]], ids=["single", "empty"])
def test_masked_whiten_single_or_no_element_is_finite(shift_mean, mask_rows):
    values = torch.tensor([[5.0, 7.0, float("nan")]])
    mask = torch.tensor(mask_rows)
    whitened = masked_whiten(values, mask, shift_mean=shift_mean)
    assert torch.isfinite(whitened).all()
    # single element: x - mean = 0 -> 0, or the mean (7) back when shift_mean=False
    expected = [[0.0, 0.0 if shift_mean or mask_rows == [[0, 0, 0]] else 7.0, 0.0]]
    torch.testing.assert_close(whitened, torch.tensor(expected))


# ----------------------------------------------------------------------------------------------------------------------
# Running reward statistics
# ----------------------------------------------------------------------------------------------------------------------


def _running(samples):
    return ppo_math.moments_to_running(ppo_math.masked_moments(torch.tensor(samples), torch.ones(len(samples))))


def test_moments_to_running_by_hand():
    # [1, 2, 3]: count 3, mean 2, m2 = 1 + 0 + 1 = 2
    torch.testing.assert_close(_running([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(_running([]), torch.zeros(3, dtype=torch.float64))


def test_merge_running_moments_by_hand():
    # a = [1, 2, 3]: n 3, mean 2, m2 2;  b = [5, 7]: n 2, mean 6, m2 2
    # n = 5, d = 4, mean = 2 + 4 * 2 / 5 = 3.6, m2 = 2 + 2 + 16 * 3 * 2 / 5 = 23.2
    # (direct: deviations of [1, 2, 3, 5, 7] from 3.6 squared: 6.76 + 2.56 + 0.36 + 1.96 + 11.56 = 23.2)
    merged = ppo_math.merge_running_moments(_running([1.0, 2.0, 3.0]), _running([5.0, 7.0]))
    torch.testing.assert_close(merged, torch.tensor([5.0, 3.6, 23.2], dtype=torch.float64))
    mean, var = ppo_math.running_mean_var(merged)
    assert (mean.item(), var.item()) == pytest.approx((3.6, 23.2 / 4))  # unbiased: m2 / (n - 1)
    assert ppo_math.running_mean_var(merged, unbiased=False)[1].item() == pytest.approx(23.2 / 5)


def test_merging_buffer_by_buffer_gives_the_moments_of_all_scores():
    torch.manual_seed(0)
    buffers = [20.0 + 5.0 * torch.randn(n) for n in (8, 3, 1, 16)]
    running = torch.zeros(3, dtype=torch.float64)
    for scores in buffers:
        running = ppo_math.merge_running_moments(running, _running(scores.tolist()))
    everything = torch.cat(buffers).double()
    mean, var = ppo_math.running_mean_var(running)
    assert running[0].item() == 28
    assert mean.item() == pytest.approx(everything.mean().item(), rel=1e-12)
    assert var.item() == pytest.approx(everything.var().item(), rel=1e-10)


def test_merge_with_an_empty_side_keeps_the_other():
    a = _running([1.0, 2.0, 3.0])
    empty = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(ppo_math.merge_running_moments(empty, a), a)
    torch.testing.assert_close(ppo_math.merge_running_moments(a, empty), a)
    torch.testing.assert_close(ppo_math.merge_running_moments(empty, empty), empty)


def test_running_mean_var_of_one_and_no_sample():
    assert [t.item() for t in ppo_math.running_mean_var(_running([4.0]))] == [4.0, 0.0]  # no Bessel for one sample
    assert [t.item() for t in ppo_math.running_mean_var(torch.zeros(3))] == [0.0, 0.0]


def test_normalize_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0])
    # mean 2, var 4 -> (x - 2) / 2 = -0.5, 0, 0.5 ; without the shift x / 2 = 0.5, 1, 1.5
    torch.testing.assert_close(ppo_math.normalize_scores(scores, 2.0, 4.0), torch.tensor([-0.5, 0.0, 0.5]))
    torch.testing.assert_close(
        ppo_math.normalize_scores(scores, 2.0, 4.0, shift_mean=False), torch.tensor([0.5, 1.0, 1.5])
    )
    assert ppo_math.normalize_scores(scores.bfloat16(), 2.0, 4.0).dtype == torch.float32
    assert torch.isfinite(ppo_math.normalize_scores(scores, 0.0, 0.0)).all()  # eps: no division by zero


# ----------------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref_logprobs = torch.tensor([[-2.0, -1.0]])
    # k1 = logp - ref = 1, -1
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0]]))
    # k3 with d = ref - logp = -1, 1:  (e^d - 1) - d = e^-1 ; e - 2
    expected_k3 = torch.tensor([[math.exp(-1.0), math.e - 2.0]])
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs, "k3"), expected_k3)


def test_kl_default_estimator_is_k1():
    logprobs, ref_logprobs = torch.tensor([[-0.5]]), torch.tensor([[-1.5]])
    assert torch.equal(kl_per_token(logprobs, ref_logprobs), kl_k1(logprobs, ref_logprobs))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_is_zero_when_the_distributions_agree(estimator):
    logprobs = -torch.rand(3, 7) * 5
    assert torch.equal(kl_per_token(logprobs, logprobs.clone(), estimator), torch.zeros(3, 7))


def test_k1_sign_and_k3_non_negative():
    torch.manual_seed(2)
    logprobs, ref_logprobs = -torch.rand(8, 16) * 6, -torch.rand(8, 16) * 6
    k1 = kl_per_token(logprobs, ref_logprobs, "k1")
    assert torch.equal(k1 > 0, logprobs > ref_logprobs)  # k1 is positive exactly where the policy is more likely
    assert (k1 < 0).any()
    k3 = kl_per_token(logprobs, ref_logprobs, "k3")
    assert (k3 >= 0).all()
    # k3 is the second-order-exact estimator: close to k2 = (logp - ref)^2 / 2 for small log-ratios
    small = 1e-3 * (logprobs - ref_logprobs)
    torch.testing.assert_close(kl_k3(small, torch.zeros_like(small)), 0.5 * small**2, rtol=1e-2, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased_monte_carlo(estimator):
    # sample y ~ pi and average the estimator: it should approach KL(pi || ref) = sum_y pi(y) log(pi(y) / ref(y))
    generator = torch.Generator().manual_seed(3)
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    true_kl = (pi * (pi / ref).log()).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=generator).view(1, -1)
    estimate = kl_per_token(pi.log()[samples], ref.log()[samples], estimator).mean()
    assert estimate.item() == pytest.approx(true_kl.item(), abs=0.01)


def test_kl_per_token_dispatches_through_the_registry(monkeypatch):
    assert KL_ESTIMATORS == {"k1": kl_k1, "k3": kl_k3}
    monkeypatch.setitem(ppo_math.KL_ESTIMATORS, "k2", lambda logp, ref: 0.5 * (logp - ref) ** 2)
    # (-1 - (-3))^2 / 2 = 2
    torch.testing.assert_close(
        kl_per_token(torch.tensor([[-1.0]]), torch.tensor([[-3.0]]), "k2"), torch.tensor([[2.0]])
    )


def test_kl_per_token_rejects_unknown_estimator_and_mismatched_shapes():
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k9")
    with pytest.raises(ValueError, match="same shape"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------------------------------------
# last_token_index / shape_rewards
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_last_token_index_by_hand(mask_dtype):
    mask = as_mask([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]], mask_dtype)
    result = last_token_index(mask)
    assert result.dtype == torch.long
    assert result.tolist() == [1, 3, -1, 2, 0]


def test_last_token_index_of_zero_length_rows():
    assert last_token_index(torch.zeros(3, 0)).tolist() == [-1, -1, -1]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_shape_rewards_by_hand(mask_dtype):
    scores = torch.tensor([2.0, 3.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)
    mask = as_mask([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], mask_dtype)
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.1 + 2.0, 0.0, 0.0],  # -0.5 * kl on the 2 response tokens, score 2 on the EOS (index 1)
            [-0.05, -0.1, -0.15, -0.2 + 3.0],  # full-length response: score 3 on the last token
            [0.0, 0.0, 0.0, 0.0],  # empty response: no KL, no score
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_shape_rewards_score_lands_on_eos_not_on_padding_after_it():
    torch.manual_seed(4)
    lengths = [5, 1, 9, 3]
    mask = prefix_masks(lengths, 9)
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    rewards = shape_rewards(scores, torch.zeros(4, 9), mask, kl_coef=0.1)
    for row, length in enumerate(lengths):
        nonzero = rewards[row].nonzero().flatten().tolist()
        assert nonzero == [length - 1]
        assert rewards[row, length - 1].item() == scores[row].item()
    assert rewards.sum().item() == pytest.approx(scores.sum().item())  # nothing on padding


def test_shape_rewards_handles_a_prompt_before_the_response():
    # mask [0, 0, 1, 1, 1, 0]: prompt, 3 response tokens, padding -> score on index 4
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    rewards = shape_rewards(torch.tensor([7.0]), torch.ones(1, 6), mask, kl_coef=1.0)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, -1.0, -1.0, -1.0 + 7.0, 0.0]]))


@pytest.mark.parametrize("kl_coef", [0.0, 0.2, 0.5])
def test_shape_rewards_adds_token_scores(kl_coef):
    kl = torch.tensor([[0.5, -0.5, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    token_scores = torch.tensor([[1.0, 2.0, 99.0], [-1.0, 0.0, 4.0]])
    rewards = shape_rewards(torch.zeros(2), kl, mask, kl_coef, token_scores=token_scores)
    # -kl_coef * kl * mask + token_scores * mask; the 99 after the response is dropped
    expected = torch.tensor(
        [[1.0 - 0.5 * kl_coef, 2.0 + 0.5 * kl_coef, 0.0], [-1.0 - kl_coef, 0.0 - kl_coef, 4.0 - kl_coef]]
    )
    torch.testing.assert_close(rewards, expected)
    # with a nonzero sequence score as well, it is added on top at the last token
    with_scores = shape_rewards(torch.tensor([3.0, 0.0]), kl, mask, kl_coef, token_scores=token_scores)
    torch.testing.assert_close(with_scores - rewards, torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))


def test_shape_rewards_is_nan_free_with_garbage_outside_the_mask():
    kl = torch.tensor([[0.1, float("nan"), float("inf")], [float("nan"), float("-inf"), 1.0]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    rewards = shape_rewards(torch.tensor([1.0, float("nan")]), kl, mask, kl_coef=0.2)
    torch.testing.assert_close(rewards, torch.tensor([[-0.02 + 1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_shape_rewards_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(torch.zeros(2, 1), torch.zeros(2, 3), torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="shape"):
        shape_rewards(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 4), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        shape_rewards(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), 0.1, token_scores=torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------------------------


def compute_gae_loop(rewards, values, mask, gamma, lam):
    """The tests' reference GAE, which `compute_gae` must match: the plain reversed loop over time (CleanRL's).

    r, V <- r * m, V * m                                                        (whatever they hold outside the mask)
    for t = T-1 .. 0:  A_t = r_t + gamma * V_{t+1} - V_t + gamma * lam * A_{t+1}    (V_T = A_T = 0)
    R = A + V; A and R are 0 outside the mask. Shapes: [B, T] -> ([B, T], [B, T]).
    """
    mask = mask.bool()
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards = torch.where(mask, rewards.detach(), 0).to(dtype)
    values = torch.where(mask, values.detach(), 0).to(dtype)
    num_steps = rewards.shape[1]
    last_gae = rewards.new_zeros(rewards.shape[0])
    advantages_reversed = []
    for t in reversed(range(num_steps)):
        next_value = values[:, t + 1] if t < num_steps - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) if num_steps else torch.zeros_like(rewards)
    returns = advantages + values
    return torch.where(mask, advantages, 0), torch.where(mask, returns, 0)


GAE_IMPLEMENTATIONS = [compute_gae, compute_gae_loop]


def test_the_reference_loop_lives_in_the_tests_not_in_the_library():
    assert not hasattr(ppo_math, "compute_gae_loop")


@pytest.mark.parametrize("gae", GAE_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("gamma", "lam", "expected_advantages"),
    [
        # r = 1, 0, 2 ; V = 0.5, 1, 1.5 (index 3 masked: r 9 and V 7 zeroed)
        # deltas: 1 + 0.9*1 - 0.5 = 1.4 ; 0 + 0.9*1.5 - 1 = 0.35 ; 2 + 0.9*0 - 1.5 = 0.5 ; gamma*lam = 0.45
        # A2 = 0.5 ; A1 = 0.35 + 0.45*0.5 = 0.575 ; A0 = 1.4 + 0.45*0.575 = 1.65875
        (0.9, 0.5, [1.65875, 0.575, 0.5]),
        # gamma = lam = 1: Monte-Carlo return minus value: (1+0+2) - 0.5 ; (0+2) - 1 ; 2 - 1.5
        (1.0, 1.0, [2.5, 1.0, 0.5]),
        # gamma = 0: A = r - V: 1 - 0.5 ; 0 - 1 ; 2 - 1.5
        (0.0, 0.95, [0.5, -1.0, 0.5]),
        # lam = 0: A = delta (one-step TD error), gamma = 0.9: 1.4 ; 0.35 ; 0.5
        (0.9, 0.0, [1.4, 0.35, 0.5]),
    ],
)
def test_gae_by_hand(gae, gamma, lam, expected_advantages):
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages = torch.tensor([expected_advantages + [0.0]])
    torch.testing.assert_close(advantages, expected_advantages)
    # returns = A + V inside the mask, 0 outside
    torch.testing.assert_close(returns, expected_advantages + torch.tensor([[0.5, 1.0, 1.5, 0.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 0.0])
@pytest.mark.parametrize("lam", [1.0, 0.95, 0.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_gae_matches_the_loop_on_random_prefix_masks(gamma, lam, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, num_steps = 7, 33
    rewards = torch.randn(batch, num_steps, generator=generator, dtype=dtype)
    values = torch.randn(batch, num_steps, generator=generator, dtype=dtype)
    lengths = torch.randint(1, num_steps + 1, (batch,), generator=generator).tolist()
    lengths[0], lengths[1] = 0, num_steps  # always one empty and one full-length row
    mask = prefix_masks(lengths, num_steps, torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    advantages_loop, returns_loop = compute_gae_loop(rewards, values, mask, gamma, lam)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert advantages.dtype == dtype
    torch.testing.assert_close(advantages, advantages_loop, **tolerance)
    torch.testing.assert_close(returns, returns_loop, **tolerance)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    assert torch.all(advantages[0] == 0) and torch.all(returns[0] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_gae_matches_the_loop_on_arbitrary_masks(seed):
    # masks with a prompt before the response (leading zeros) and random holes: both implementations share semantics
    generator = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(5, 20, generator=generator), torch.randn(5, 20, generator=generator)
    mask = torch.rand(5, 20, generator=generator) > 0.3
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.0, 0.0)]:
        for got, want in zip(
            compute_gae(rewards, values, mask, gamma, lam), compute_gae_loop(rewards, values, mask, gamma, lam)
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gae", GAE_IMPLEMENTATIONS)
def test_gae_ignores_garbage_outside_the_mask_and_zeroes_empty_rows(gae):
    rewards = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), float("nan"), 3.0]])
    values = torch.tensor([[0.5, 0.25, float("inf")], [float("nan"), 1.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    # row 0: A1 = 2 - 0.25 = 1.75 ; A0 = 1 + 0.25 - 0.5 + A1 = 2.5 ; R = A + V = 3, 2 ; row 1 empty
    torch.testing.assert_close(advantages, torch.tensor([[2.5, 1.75, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("gae", GAE_IMPLEMENTATIONS)
def test_gae_of_an_all_masked_batch_is_zero(gae):
    advantages, returns = gae(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(3, 5), 0.99, 0.95)
    assert torch.equal(advantages, torch.zeros(3, 5)) and torch.equal(returns, torch.zeros(3, 5))


@pytest.mark.parametrize("gae", GAE_IMPLEMENTATIONS)
def test_gae_outputs_are_detached_targets(gae):
    values = torch.randn(2, 4, requires_grad=True)
    advantages, returns = gae(torch.randn(2, 4), values, torch.ones(2, 4), 0.9, 0.9)
    assert not advantages.requires_grad and not returns.requires_grad


def test_vectorised_gae_is_stable_for_long_sequences_with_small_discount():
    # the "divide by (gamma*lam)^t" trick would overflow here (0.1^-2000); the discount matrix must not
    rewards, values = torch.randn(2, 2000), torch.randn(2, 2000)
    mask = torch.ones(2, 2000)
    advantages, returns = compute_gae(rewards, values, mask, 0.5, 0.2)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    torch.testing.assert_close(advantages, compute_gae_loop(rewards, values, mask, 0.5, 0.2)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("gamma", "lam"), [(1.5, 0.9), (0.9, -0.1)])
def test_gae_rejects_out_of_range_discounts(gamma, lam):
    with pytest.raises(ValueError, match="must be in"):
        compute_gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma, lam)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        compute_gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2), 1.0, 1.0)


@pytest.mark.parametrize(
    "lam, expected",
    [
        # gamma = lam = 1: R = [10, 10] whatever V; c = mean(R - V) = (9 + 8) / 2 = 8.5
        (1.0, 8.5),
        # lam = 0.5: deltas [0 + 2 - 1, 10 - 2] = [1, 8] -> A = [1 + 0.5 * 8, 8] = [5, 8], sum 13;
        # unit values: deltas [1 - 1, 0 - 1] = [0, -1] -> A = [-0.5, -1], sum -1.5; c = 13 / 1.5
        (0.5, 13 / 1.5),
    ],
)
def test_mean_return_offset_by_hand(lam, expected):
    rewards = torch.tensor([[0.0, 10.0, 99.0]])
    values = torch.tensor([[1.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    terms = ppo_math.mean_return_offset_terms(rewards, values, mask, gamma=1.0, lam=lam)
    offset = ppo_math.mean_return_offset(terms)
    assert offset.item() == pytest.approx(expected)
    shifted = values + offset.float() * mask
    _, returns = compute_gae(rewards, shifted, mask, 1.0, lam)
    assert masked_mean(returns, mask).item() == pytest.approx(masked_mean(shifted, mask).item(), abs=1e-5)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8)])
def test_mean_return_offset_makes_the_mean_value_the_mean_return(gamma, lam):
    torch.manual_seed(2)
    rewards, values = torch.randn(5, 9), torch.randn(5, 9)
    mask = prefix_masks([9, 4, 1, 7, 2], 9)
    # Terms summed over two "processes" (rows 0-1 and 2-4) give the offset of the whole buffer.
    terms = sum(
        ppo_math.mean_return_offset_terms(rewards[rows], values[rows], mask[rows], gamma, lam)
        for rows in (slice(0, 2), slice(2, 5))
    )
    shifted = values + ppo_math.mean_return_offset(terms).float() * mask
    _, returns = compute_gae(rewards, shifted, mask, gamma, lam)
    assert masked_mean(returns, mask).item() == pytest.approx(masked_mean(shifted, mask).item(), abs=1e-5)


def test_mean_return_offset_of_an_empty_mask_is_zero():
    terms = ppo_math.mean_return_offset_terms(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 1.0, 1.0)
    assert ppo_math.mean_return_offset(terms).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# policy_loss
# ----------------------------------------------------------------------------------------------------------------------


def _policy_case(mask_dtype=torch.float32):
    # ratios 1.5, 0.5, 1.1, 0.5, 1.5 (old_logprobs = 0) and a masked 6th token with an absurd log-ratio
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5]
    logprobs = torch.tensor([[math.log(r) for r in ratios] + [1000.0]], requires_grad=True)
    old_logprobs = torch.zeros(1, 6)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 5.0]])
    mask = as_mask([[1, 1, 1, 1, 1, 0]], mask_dtype)
    return logprobs, old_logprobs, advantages, mask, ratios


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_policy_loss_by_hand(mask_dtype):
    logprobs, old_logprobs, advantages, mask, ratios = _policy_case(mask_dtype)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2 clipped | A=+1 r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1 r=1.1: max(1.1, 1.1) = 1.1           | A=-1 r=0.5: max(0.5, 0.8) = 0.8 clipped
    #   A=-1 r=1.5: max(1.5, 1.2) = 1.5
    # loss = (-1.2 - 0.5 + 1.1 + 0.8 + 1.5) / 5 = 0.34 ; clipfrac = 2/5
    torch.testing.assert_close(loss, torch.tensor(0.34))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.4))
    torch.testing.assert_close(stats["ratio"], torch.tensor(sum(ratios) / 5))  # 5.1 / 5 = 1.02
    torch.testing.assert_close(stats["approxkl"], torch.tensor(0.5 * sum(math.log(r) ** 2 for r in ratios) / 5))
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logprobs, old_logprobs, advantages, mask, _ = _policy_case()
    loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    loss.backward()
    # d/dlogp of -A * r = -A * r on unclipped tokens, 0 on clipped and masked ones, / 5 tokens
    expected = torch.tensor([[0.0, -0.5, 1.1, 0.0, 1.5, 0.0]]) / 5
    torch.testing.assert_close(logprobs.grad, expected)


@pytest.mark.parametrize("advantage", [2.0, -2.0])
@pytest.mark.parametrize("log_ratio", [0.5, -0.5, 0.05])
def test_policy_clipping_with_positive_and_negative_advantages(advantage, log_ratio):
    cliprange = 0.2
    logprobs = torch.full((1, 3), log_ratio, requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 3), torch.full((1, 3), advantage), torch.ones(1, 3), cliprange)
    ratio = math.exp(log_ratio)
    # clipping binds only when the ratio left the trust region in the direction the advantage pushes it
    binds = (advantage > 0 and ratio > 1 + cliprange) or (advantage < 0 and ratio < 1 - cliprange)
    expected_ratio = min(max(ratio, 1 - cliprange), 1 + cliprange) if binds else ratio
    torch.testing.assert_close(loss, torch.tensor(-advantage * expected_ratio))
    assert stats["clipfrac"].item() == (1.0 if binds else 0.0)
    loss.backward()
    assert (logprobs.grad == 0).all() == binds


def test_policy_loss_at_the_rollout_policy_is_minus_the_mean_advantage():
    torch.manual_seed(5)
    logprobs = -torch.rand(4, 10)
    advantages, mask = torch.randn(4, 10), prefix_masks([10, 3, 0, 7], 10)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, 0.2)
    torch.testing.assert_close(loss, -masked_mean(advantages, mask))
    assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0 and stats["ratio"].item() == 1.0


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_policy_loss_is_nan_free_on_all_masked_input(mask_dtype):
    logprobs = torch.tensor([[float("inf"), -3.0], [1000.0, float("nan")]], requires_grad=True)
    mask = torch.zeros(2, 2).to(mask_dtype)
    loss, stats = policy_loss(logprobs, torch.zeros(2, 2), torch.full((2, 2), float("nan")), mask, 0.2)
    assert loss.item() == 0.0 and all(value.item() == 0.0 for value in stats.values())
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(2, 2))


def test_policy_loss_rejects_negative_cliprange():
    with pytest.raises(ValueError, match="cliprange"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -0.1)


# ----------------------------------------------------------------------------------------------------------------------
# value_loss
# ----------------------------------------------------------------------------------------------------------------------


def _value_case(mask_dtype=torch.float32):
    # token:       0     1     2     3     4 (masked)
    values = torch.tensor([[1.0, 2.0, 0.0, -1.0, 50.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 1.9, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 1.0, 1.0, -50.0]])
    mask = as_mask([[1, 1, 1, 1, 0]], mask_dtype)
    return values, old_values, returns, mask


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_value_loss_unclipped_by_hand(mask_dtype):
    values, old_values, returns, mask = _value_case(mask_dtype)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=None)
    # (V - R)^2 = 0, 1, 1, 4 -> error = 6/4 = 1.5, loss = 0.5 * 1.5 = 0.75, no clipping
    torch.testing.assert_close(loss, torch.tensor(0.75))
    torch.testing.assert_close(stats["error"], torch.tensor(1.5))
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    # d/dV 0.5 * mean((V - R)^2) = (V - R) / 4 ; 0 on the masked token
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0, -1.0, -2.0, 0.0]]) / 4)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_value_loss_clipped_by_hand(mask_dtype):
    values, old_values, returns, mask = _value_case(mask_dtype)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # V_clip = old + clamp(V - old, -0.2, 0.2) = 0.2, 2.0, 0.0, -0.2
    # (V_clip - R)^2 = 0.64, 1, 1, 1.44 vs (V - R)^2 = 0, 1, 1, 4 -> max = 0.64, 1, 1, 4 (clipping binds on token 0)
    # loss = 0.5 * 6.64 / 4 = 0.83 ; clipfrac = 1/4 ; error is the unclipped 1.5
    torch.testing.assert_close(loss, torch.tensor(0.83))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.25))
    torch.testing.assert_close(stats["error"], torch.tensor(1.5))
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())
    loss.backward()
    # token 0: the clipped term wins and V_clip is saturated -> no gradient ; others (V - R) / 4
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0, -1.0, -2.0, 0.0]]) / 4)


def test_value_clipping_that_does_not_bind_equals_the_unclipped_loss():
    values, old_values, returns, mask = _value_case()
    mask = torch.tensor([[0, 1, 1, 1, 0]])  # drop token 0, the only one where clipping binds
    clipped_loss, clipped_stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    plain_loss, _ = value_loss(values, old_values, returns, mask, cliprange_value=None)
    # 0.5 * (1 + 1 + 4) / 3 = 1.0 either way
    torch.testing.assert_close(clipped_loss, torch.tensor(1.0))
    torch.testing.assert_close(plain_loss, torch.tensor(1.0))
    assert clipped_stats["clipfrac"].item() == 0.0


def test_value_clipping_gradient_vanishes_when_the_clipped_term_is_larger():
    # V moved 1.0 from old (0) toward R (1) beyond c = 0.2: clipped loss (0.2 - 1)^2 wins and has no gradient in V
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, stats = value_loss(values, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0.64))
    assert stats["clipfrac"].item() == 1.0
    loss.backward()
    assert values.grad.item() == 0.0


@pytest.mark.parametrize("cliprange_value", [None, 0.2])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_value_loss_is_nan_free_on_all_masked_input(cliprange_value, mask_dtype):
    values = torch.tensor([[float("inf"), 1.0]], requires_grad=True)
    returns = torch.tensor([[float("nan"), 2.0]])
    loss, stats = value_loss(values, torch.zeros(1, 2), returns, torch.zeros(1, 2).to(mask_dtype), cliprange_value)
    assert loss.item() == 0.0 and all(value.item() == 0.0 for value in stats.values())
    loss.backward()
    assert torch.equal(values.grad, torch.zeros(1, 2))


def test_value_loss_rejects_negative_cliprange():
    with pytest.raises(ValueError, match="cliprange_value"):
        value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -1.0)


# ----------------------------------------------------------------------------------------------------------------------
# entropy_from_logits
# ----------------------------------------------------------------------------------------------------------------------


def test_entropy_by_hand():
    # uniform over 4 tokens: log 4 ; a single allowed token (others -inf): 0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, float("-inf"), float("-inf"), float("-inf")]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), 0.0]]))


def test_entropy_matches_torch_distributions_and_is_differentiable():
    torch.manual_seed(6)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16).requires_grad_(True)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (3, 5)
    expected = torch.distributions.Categorical(logits=logits.detach().float()).entropy()
    torch.testing.assert_close(entropy, expected)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0
