"""The PPO math of SRPPO as pure functions: masked and running statistics, KL estimators, reward shaping, GAE, the
losses.

Importable with torch alone. Conventions shared by every function:

* `B` is the batch size, `T` the number of response positions, `V` the vocabulary size;
* a mask is a 0/1 tensor (bool, int or float) of the same shape as the values it masks: nonzero means "inside".
  Masks are treated as 0/1, not as weights;
* positions outside the mask never influence a result, not even when they hold `inf` or `NaN`, and never receive a
  gradient; an empty mask gives zeros, never `NaN`;
* results are floating point: float64 inputs stay float64, everything else (bf16, fp16, integers) is computed in
  float32;
* the loss functions return `(loss, stats)` where `loss` is a differentiable scalar and `stats` a dict of detached
  scalars for logging.

The formulas follow the usual PPO-for-LLMs recipe (OpenRLHF `models/utils.py` and `models/loss.py`, TRL's PPO
trainer): a per-token KL penalty to the reference model plus a sequence score at the EOS token, GAE over response
tokens, the clipped surrogate policy loss and the (optionally) clipped value loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


__all__ = [
    "KL_ESTIMATORS",
    "compute_gae",
    "entropy_from_logits",
    "kl_k1",
    "kl_k3",
    "kl_per_token",
    "last_token_index",
    "moments_to_mean_var",
    "masked_mean",
    "masked_moments",
    "masked_var",
    "masked_whiten",
    "mean_return_offset",
    "mean_return_offset_terms",
    "merge_running_moments",
    "moments_to_running",
    "normalize_scores",
    "policy_loss",
    "running_mean_var",
    "shape_rewards",
    "value_loss",
]

WHITEN_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def _as_float(x: Tensor) -> Tensor:
    """`x` in float32, or unchanged if it is already float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _bool_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """`mask != 0` as a bool tensor, after checking that it has the shape of `like`."""
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of the values it masks, got {tuple(mask.shape)} vs {tuple(like.shape)}."
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_outside(values: Tensor, mask: Tensor) -> Tensor:
    """`values` (as float) where `mask` is true, 0 elsewhere; no gradient reaches masked positions."""
    values = _as_float(values)
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"These tensors must all have the same shape, got {shapes}.")


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a [B, T] tensor, got shape {tuple(x.shape)}.")


# ----------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, *, axis: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is nonzero.

        masked_mean(x, m) = sum_i m_i x_i / sum_i m_i          (0 when sum_i m_i = 0)

    Shapes: `values` and `mask` of the same shape; `dim=None` -> scalar, otherwise that dimension is reduced. `axis`
    is an alias of `dim` (TRL 1.12's `masked_mean(values, mask, axis=None)`).
    """
    if axis is not None:
        if dim is not None and dim != axis:
            raise ValueError(f"masked_mean got dim={dim} and axis={axis}: pass only one of them (axis is an alias).")
        dim = axis
    mask = _bool_mask(mask, values)
    total = _zero_outside(values, mask)
    if dim is None:
        total, count = total.sum(), mask.sum()
    else:
        total, count = total.sum(dim=dim), mask.sum(dim=dim)
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over the positions where `mask` is nonzero (all of them, as one population).

        mu = masked_mean(x, m),  var = masked_mean((x - mu)^2, m) * (n / (n - 1) if unbiased and n > 1 else 1)

    with `n = sum_i m_i`. With `n <= 1` the result is 0 (no Bessel correction, so no division by zero).
    Shapes: `values` and `mask` of the same shape -> scalar.
    """
    mask = _bool_mask(mask, values)
    mean = masked_mean(values, mask)
    var = masked_mean((_zero_outside(values, mask) - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """`[sum, sum of squares, count]` of `values` over the mask, as one float tensor of 3 elements.

    Summable across processes (one all-reduce) and turned into a mean and variance by `moments_to_mean_var`: the way to
    whiten over a rollout buffer split between processes. Shapes: `values` and `mask` of the same shape -> [3].
    """
    mask = _bool_mask(mask, values)
    x = _zero_outside(values, mask).double()  # sum of squares minus squared mean: float64 keeps the variance exact
    return torch.stack([x.sum(), (x * x).sum(), mask.sum().to(x.dtype)])


def moments_to_mean_var(moments: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """(mean, variance) from `masked_moments` (possibly summed over processes); (0, 0) for a count of 0, and no
    Bessel correction for a count of 1, as in `masked_var`."""
    total, total_sq, n = moments.unbind()
    mean = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
    var = torch.where(n > 0, total_sq / n.clamp(min=1) - mean * mean, torch.zeros_like(total)).clamp(min=0)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return mean, var


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, mean: Tensor | None = None, var: Tensor | None = None
) -> Tensor:
    """Normalise `values` to zero mean and unit variance over the mask (one mean/variance for the whole tensor).

        mu, var = masked_mean(x, m), masked_var(x, m)      (or the `mean`, `var` given, e.g. over all processes)
        y = (x - mu) / sqrt(var + 1e-8)        (+ mu again when shift_mean=False),    y = 0 outside the mask

    A single unmasked element gives `x - mu = 0`, hence 0 (or `mu` when `shift_mean=False`), never `NaN`.
    Shapes: `values` and `mask` of the same shape -> same shape; `mean`, `var` scalars.
    """
    mask = _bool_mask(mask, values)
    if (mean is None) != (var is None):
        raise ValueError("Pass both `mean` and `var` (statistics computed elsewhere), or neither.")
    if mean is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    dtype = _as_float(values).dtype
    mean, var = torch.as_tensor(mean).to(dtype), torch.as_tensor(var).to(dtype)
    whitened = (_zero_outside(values, mask) - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_outside(whitened, mask)


# ----------------------------------------------------------------------------------------------------------------------
# Running reward statistics (reward normalisation across rollout buffers)
# ----------------------------------------------------------------------------------------------------------------------


def moments_to_running(moments: Tensor) -> Tensor:
    """`masked_moments` (`[sum, sum of squares, count]`, possibly summed over processes) as running moments
    `[count, mean, m2]` in float64, where `m2 = sum_i (x_i - mean)^2`; all zeros for a count of 0.

    Shapes: [3] -> [3].
    """
    total, total_sq, n = moments.double().unbind()
    mean = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
    m2 = torch.where(n > 0, total_sq - n * mean * mean, torch.zeros_like(total)).clamp(min=0)
    return torch.stack([n, mean, m2])


def merge_running_moments(running: Tensor, batch: Tensor) -> Tensor:
    """Running moments `[count, mean, m2]` of the union of two samples (Chan, Golub and LeVeque's parallel merge; the
    update of stable-baselines3's `RunningMeanStd` and of TRL's former `RunningMoments`):

        n = n_a + n_b,   d = mean_b - mean_a
        mean = mean_a + d * n_b / n
        m2   = m2_a + m2_b + d^2 * n_a * n_b / n

    Exact whatever the order of the samples, so merging buffer by buffer gives the moments of all scores seen. A side
    with a count of 0 leaves the other unchanged. Computed in float64. Shapes: [3], [3] -> [3].
    """
    n_a, mean_a, m2_a = running.double().unbind()
    n_b, mean_b, m2_b = batch.double().unbind()
    n = n_a + n_b
    if n.item() == 0:
        return torch.zeros(3, dtype=torch.float64, device=running.device)
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = m2_a + m2_b + delta * delta * n_a * n_b / n
    return torch.stack([n, mean, m2])


def running_mean_var(running: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """(mean, variance) of running moments `[count, mean, m2]`: `var = m2 / (n - 1)` (`m2 / n` when not `unbiased`,
    or when n = 1); (0, 0) for a count of 0. Shapes: [3] -> (scalar, scalar), float64."""
    n, mean, m2 = running.double().unbind()
    denominator = n - 1 if unbiased else n
    denominator = torch.where(denominator > 0, denominator, n)
    var = torch.where(n > 0, m2 / denominator.clamp(min=1), torch.zeros_like(m2))
    return mean, var


def normalize_scores(scores: Tensor, mean: Tensor, var: Tensor, shift_mean: bool = True) -> Tensor:
    """Scores normalised by running statistics: `(scores - mean) / sqrt(var + 1e-8)` (`scores / sqrt(var + 1e-8)` when
    not `shift_mean`). Shapes: `scores` [B], `mean`, `var` scalars -> [B] (float32 unless `scores` is float64)."""
    scores = _as_float(scores)
    mean, var = torch.as_tensor(mean).to(scores), torch.as_tensor(var).to(scores)
    centred = scores - mean if shift_mean else scores
    return centred * torch.rsqrt(var + WHITEN_EPS)


# ----------------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020), per sampled token y_t ~ pi
# ----------------------------------------------------------------------------------------------------------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t): unbiased estimate of KL(pi || pi_ref), negative on some tokens.

    Shapes: [B, T], [B, T] -> [B, T].
    """
    return _as_float(logprobs) - _as_float(ref_logprobs)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(y_t) / pi(y_t) = exp(ref_logp - logp): unbiased and always >= 0.

    Computed as `expm1(d) - d` with `d = ref_logp - logp`, which is exact near `d = 0`.
    Shapes: [B, T], [B, T] -> [B, T].
    """
    log_ratio = _as_float(ref_logprobs) - _as_float(logprobs)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) on the sampled tokens, by the estimator named in `KL_ESTIMATORS`.

    Shapes: `logprobs` [B, T] (policy), `ref_logprobs` [B, T] (reference) -> [B, T]. Not masked: `shape_rewards`
    applies the response mask.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {estimator!r}: choose one of {sorted(KL_ESTIMATORS)}.")
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


# ----------------------------------------------------------------------------------------------------------------------
# Reward shaping
# ----------------------------------------------------------------------------------------------------------------------


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last nonzero entry of each row of `mask`, -1 for a row without any.

    Shapes: `mask` [B, T] -> [B] long. With a response mask this is the EOS token (or the last generated token of a
    truncated response), never a padding position after it.
    """
    _check_2d("mask", mask)
    mask = mask if mask.dtype == torch.bool else mask != 0
    if mask.shape[1] == 0:
        return torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)


def shape_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, token_scores: Tensor | None = None
) -> Tensor:
    """Per-token PPO rewards: the KL penalty on every response token plus the sequence score on its last token.

        rewards[b, t] = -kl_coef * kl[b, t] * m[b, t]
                        + scores[b] * [t == last_token_index(m)[b]]
                        + token_scores[b, t] * m[b, t]                   (only when token_scores is given)

    The score lands on the last response token (EOS), never on padding after it; a row with an empty mask gets no
    score and all-zero rewards. For a token-level reward, pass `scores = zeros(B)` and the per-token rewards as
    `token_scores`.
    Shapes: `scores` [B], `kl` [B, T], `mask` [B, T] (1 on response tokens incl. EOS), `token_scores` [B, T]
    -> [B, T].
    """
    _check_2d("kl", kl)
    mask = _bool_mask(mask, kl)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores must be a [B] tensor with B = {kl.shape[0]}, got shape {tuple(scores.shape)}.")
    rewards = -kl_coef * _zero_outside(kl, mask)
    last = last_token_index(mask)
    has_response = last >= 0
    scores = _as_float(scores).to(rewards.dtype)
    scores = torch.where(has_response, scores, torch.zeros_like(scores))
    rewards = rewards + torch.zeros_like(rewards).scatter(1, last.clamp(min=0).unsqueeze(1), scores.unsqueeze(1))
    if token_scores is not None:
        _check_same_shape(token_scores=token_scores, kl=kl)
        rewards = rewards + _zero_outside(token_scores, mask).to(rewards.dtype)
    return rewards


# ----------------------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------------------------------


def _gae_inputs(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}.")
    _check_2d("rewards", rewards)
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    mask = _bool_mask(mask, rewards)
    dtype = torch.promote_types(_as_float(rewards).dtype, _as_float(values).dtype)
    rewards = _zero_outside(rewards.detach(), mask).to(dtype)
    values = _zero_outside(values.detach(), mask).to(dtype)
    return rewards, values, mask


def _gae_deltas(rewards: Tensor, values: Tensor, gamma: float) -> Tensor:
    """delta_t = r_t + gamma * V_{t+1} - V_t with V_T = 0. Shapes: [B, T] -> [B, T]."""
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    return rewards + gamma * next_values - values


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns, vectorised over time.

        r, V  <- r * m, V * m                                  (zeroed outside the mask first)
        delta_t = r_t + gamma * V_{t+1} - V_t,                 V_T = 0
        A_t     = delta_t + gamma * lam * A_{t+1}  =  sum_{k >= t} (gamma * lam)^(k - t) * delta_k
        R_t     = A_t + V_t
        A, R    <- A * m, R * m

    The sum is a product with the upper-triangular discount matrix `D[t, k] = (gamma * lam)^(k - t)` (k >= t), built
    with non-negative exponents only, so it neither overflows nor divides by a vanishing power (unlike the
    "divide by (gamma*lam)^t, cumsum, multiply back" trick). Cost O(B * T^2), memory O(T^2): negligible for response
    lengths in the thousands. The tests check it against the plain reversed loop over time.

    Inputs are detached: advantages and returns are regression/weighting targets, not differentiable outputs.
    The mask is expected to be contiguous per row (a response); zeroed values inside a hole would act as V = 0.
    Shapes: `rewards`, `values`, `mask` [B, T] -> (`advantages` [B, T], `returns` [B, T]).
    """
    rewards, values, mask = _gae_inputs(rewards, values, mask, gamma, lam)
    deltas = _gae_deltas(rewards, values, gamma)
    steps = torch.arange(rewards.shape[1], device=rewards.device)
    exponents = steps.unsqueeze(0) - steps.unsqueeze(1)  # [t, k] -> k - t
    base = torch.tensor(gamma * lam, dtype=deltas.dtype, device=deltas.device)
    # torch.pow(0, 0) == 1, so gamma * lam = 0 gives the identity matrix (A = delta) as it should.
    discount = torch.where(exponents >= 0, base.pow(exponents.clamp(min=0).to(deltas.dtype)), 0.0)
    advantages = deltas @ discount.T
    returns = advantages + values
    return _zero_outside(advantages, mask), _zero_outside(returns, mask)


def mean_return_offset_terms(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """`[sum of A(r, V), sum of A(0, m)]` over the mask, summable across processes; see `mean_return_offset`.

    GAE is linear in the rewards and values, so shifting every value by `c` gives
    `A(r, V + c * m) = A(r, V) + c * A(0, m)`, where `A(0, m)` is the advantage of zero rewards under values of 1.
    Shapes: `rewards`, `values`, `mask` [B, T] -> [2] (float64).
    """
    advantages, _ = compute_gae(rewards, values, mask, gamma, lam)
    unit, _ = compute_gae(torch.zeros_like(_as_float(rewards)), _as_float(mask), mask, gamma, lam)
    mask = _bool_mask(mask, rewards)
    return torch.stack([_zero_outside(advantages, mask).double().sum(), _zero_outside(unit, mask).double().sum()])


def mean_return_offset(terms: Tensor) -> Tensor:
    """The shift `c` of every value that makes the mean value equal the mean return over the mask:

        mean(R(V + c)) = mean(V + c)   <=>   sum A(r, V + c) = 0   <=>   c = -sum A(r, V) / sum A(0, m)

    `terms` from `mean_return_offset_terms` (summed over processes). `sum A(0, m) < 0` for any non-empty response
    (its last delta is -1, the others gamma - 1 <= 0), so `c` exists; 0 for an empty mask. With gamma = lam = 1 the
    returns do not depend on the values and `c` is the mean of `R - V`. Shapes: [2] -> scalar (float64).
    """
    advantage_sum, unit_sum = terms.double().unbind()
    return torch.where(unit_sum < 0, -advantage_sum / unit_sum.clamp(max=-1e-12), torch.zeros_like(advantage_sum))


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (to minimise), averaged over the response tokens of the whole batch.

        ratio_t = exp(logp_t - old_logp_t)
        loss    = masked_mean( max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - c, 1 + c)), m )

    Stats (detached scalars):
        "clipfrac" = masked_mean( [clipped term > unclipped term] ), the fraction of tokens where clipping binds
        "approxkl" = 0.5 * masked_mean( (logp - old_logp)^2 ), the k2 estimate of KL(old || new)
        "ratio"    = masked_mean( ratio )
    Outside the mask the log-ratio is set to 0 before `exp`, so padding can neither overflow nor send a gradient.
    Shapes: `logprobs` (with grad), `old_logprobs`, `advantages`, `mask` [B, T] -> scalar loss.
    """
    if cliprange < 0:
        raise ValueError(f"cliprange must be non-negative, got {cliprange}.")
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    mask = _bool_mask(mask, logprobs)
    log_ratio = _zero_outside(_as_float(logprobs) - _as_float(old_logprobs).detach(), mask)
    advantages = _zero_outside(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss (to minimise), optionally clipped around the rollout-time values.

        unclipped (cliprange_value is None):  loss = 0.5 * masked_mean( (V - R)^2, m )
        clipped:   V_clip = V_old + clamp(V - V_old, -c, c)
                   loss   = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2), m )

    Stats (detached scalars):
        "clipfrac" = masked_mean( [(V_clip - R)^2 > (V - R)^2] ), 0 without clipping
        "error"    = masked_mean( (V - R)^2 )
    Shapes: `values` (with grad), `old_values`, `returns`, `mask` [B, T] -> scalar loss.
    """
    if cliprange_value is not None and cliprange_value < 0:
        raise ValueError(f"cliprange_value must be non-negative or None, got {cliprange_value}.")
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    mask = _bool_mask(mask, values)
    values = _zero_outside(values, mask)
    returns = _zero_outside(returns.detach(), mask)
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        per_token = unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old_values = _zero_outside(old_values.detach(), mask)
        values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        clipped = (values_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask).detach()
    loss = 0.5 * masked_mean(per_token, mask)
    stats = {"clipfrac": clipfrac, "error": masked_mean(unclipped, mask).detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Entropy
# ----------------------------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits), in nats, computed in fp32 one batch row at a time.

        H = logsumexp(z) - sum_v softmax(z)_v * z_v

    Logits of -inf (banned tokens) contribute 0, not NaN. Shapes: `logits` [B, ..., V] -> [B, ...] float32 (float64
    kept). Differentiable.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must have a batch and a vocabulary dimension, got shape {tuple(logits.shape)}.")
    rows = []
    for row in logits:
        row = _as_float(row)
        finite_row = row.clamp(min=torch.finfo(row.dtype).min)  # p * z with z = -inf would be 0 * inf = NaN
        rows.append(torch.logsumexp(row, dim=-1) - (torch.softmax(row, dim=-1) * finite_row).sum(dim=-1))
    return torch.stack(rows)
