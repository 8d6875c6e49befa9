"""The reward of sampled responses on held-out prompts, with bootstrap confidence intervals.

    stats = sample_reward_stats(trainer, eval_prompts, num_samples=4, seed=0)   # the trainer's current policy
    stats["reward_mean"], stats["reward_ci95"]          # mean over prompts of the per-prompt mean reward
    diff = paired_difference(after["per_prompt_reward"], before["per_prompt_reward"])   # SRPPO - SFT, same prompts

Each prompt gets `num_samples` responses sampled exactly as in training (the trainer's rollout path); their reward
(the coherent reward for a `CoherentRewardModel`, else the reward model's score) and their KL to the reference
(summed per-token log pi - log pi_ref, k1) are averaged per prompt. Intervals resample prompts (percentile
bootstrap), the unit that varies between evaluations.
"""

from __future__ import annotations

import math

import torch


def bootstrap_ci(values, num_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (a 1-D sequence); (nan, nan) when empty."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(x) == 0:
        return (math.nan, math.nan)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(x), (num_resamples, len(x)), generator=generator)
    means = x[index].mean(dim=1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return (low, high)


def nested_bootstrap_ci(
    groups, num_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over groups of each group's mean, with a two-level percentile bootstrap interval.

    `groups` is one sequence of per-prompt values per training seed. Each resample draws the seeds with replacement,
    then, within each drawn seed, its prompts with replacement: the interval covers both the training seeds and the
    prompts. With one seed it is the prompt bootstrap. For a paired difference, pass each seed's per-prompt
    differences. Empty input gives (nan, nan, nan).
    """
    import numpy as np

    arrays = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    if not arrays or any(len(a) == 0 for a in arrays):
        if arrays and any(len(a) for a in arrays):
            raise ValueError("Every seed needs at least one per-prompt value; one of the groups is empty.")
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    picks = rng.integers(len(arrays), size=(num_resamples, len(arrays)))
    for r in range(num_resamples):
        means[r] = np.mean([arrays[g][rng.integers(len(arrays[g]), size=len(arrays[g]))].mean() for g in picks[r]])
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(np.mean([a.mean() for a in arrays])), float(low), float(high))


def paired_difference(after, before, num_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean and bootstrap interval of `after - before`, prompt by prompt (both lists in the same prompt order)."""
    if len(after) != len(before):
        raise ValueError(f"Paired values need the same prompts: got {len(after)} and {len(before)} values.")
    diff = [a - b for a, b in zip(after, before)]
    return {"mean": sum(diff) / len(diff) if diff else math.nan, "ci95": bootstrap_ci(diff, num_resamples, seed)}


@torch.no_grad()
def sample_reward_stats(trainer, prompts, num_samples: int = 4, seed: int = 0) -> dict:
    """Reward and KL of `num_samples` sampled responses per prompt under the trainer's current policy.

    Returns {'per_prompt_reward': [P], 'per_prompt_kl': [P], 'reward_mean', 'reward_ci95', 'kl_mean', 'kl_ci95',
    'mean_length', 'eos_rate', 'num_prompts', 'num_samples'}.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    if "input_ids" not in prompts.column_names:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        prompts = trainer._prepare_dataset(prompts, trainer.processing_class, policy, trainer.args, "eval_dataset")
    device = trainer.accelerator.device
    was_training = trainer.model.training
    trainer.model.eval()
    torch.manual_seed(seed)
    rewards, kls, lengths, stops = [], [], [], []
    batch_prompts = max(1, trainer.args.local_rollout_forward_batch_size // num_samples)
    try:
        for start in range(0, len(prompts), batch_prompts):
            rows = prompts.select(range(start, min(start + batch_prompts, len(prompts))))
            features = [{"input_ids": ids} for ids in rows["input_ids"] for _ in range(num_samples)]
            batch = {k: v.to(device) for k, v in trainer._collate(features).items()}
            scored = trainer.score_rollouts(trainer.generate_rollouts(batch))
            mask = scored["response_mask"].float()
            reward = scored.get("coherent_reward", scored["scores"])
            kl = ((scored["logprobs"] - scored["ref_logprobs"]) * mask).sum(-1)
            rewards.append(reward.float().view(-1, num_samples).mean(-1).cpu())
            kls.append(kl.float().view(-1, num_samples).mean(-1).cpu())
            lengths.append(mask.sum(-1).cpu())
            stops.append(scored["has_stop"].float().cpu())
    finally:
        trainer.model.train(was_training)
    reward, kl = torch.cat(rewards), torch.cat(kls)
    return {
        "per_prompt_reward": reward.tolist(),
        "per_prompt_kl": kl.tolist(),
        "reward_mean": reward.mean().item(),
        "reward_ci95": bootstrap_ci(reward, seed=seed),
        "kl_mean": kl.mean().item(),
        "kl_ci95": bootstrap_ci(kl, seed=seed),
        "mean_length": torch.cat(lengths).mean().item(),
        "eos_rate": torch.cat(stops).mean().item(),
        "num_prompts": len(reward),
        "num_samples": num_samples,
    }


__all__ = ["bootstrap_ci", "nested_bootstrap_ci", "paired_difference", "sample_reward_stats"]
