"""Phase 3 of a rollout buffer (`RolloutBuffer` in, `RolloutBuffer` out), and what the PPO update needs.

`compute_advantages` shapes the per-token rewards (KL penalty, score at EOS or per token), runs GAE and whitens the
advantages over the whole buffer (all processes). The update itself (phase 4: `compute_loss`, the optimizer with its
actor and critic parameter groups, their learning-rate schedules and gradient clipping) is made of `Trainer` overrides
in `SRPPOTrainer`; this module holds its helpers: the actor's optimizer-state reset after the critic warm-up and the
per-role schedule. The math itself is in `ppo_math.py`. `PPOStepMixin` is a part of `SRPPOTrainer`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from . import ppo_math
from .rollout import RolloutBuffer


logger = logging.getLogger(__name__)


class PPOStepMixin:
    """`SRPPOTrainer`'s advantage phase and the helpers of its update (the `Trainer` overrides `compute_loss`,
    `create_optimizer`, `create_scheduler` and `_clip_grad_norm` are in `SRPPOTrainer` itself)."""

    # ------------------------------------------------------------------ phase 3: advantages

    def compute_advantages(self, scored: RolloutBuffer) -> RolloutBuffer:
        """Per-token rewards (KL penalty + score at EOS, or the token-level reward), GAE advantages and returns.

        Returns the buffer with its phase-3 fields set: `kl`, `rewards`, `advantages`, `returns` and, with
        `normalize_reward`, `normalized_scores`. With `value_bias_init` (first buffer only) `values` and the kept
        `first_forward` come back shifted by the critic head's new bias.
        """
        args = self.args
        mask = scored.response_mask.float()
        kl = ppo_math.kl_per_token(scored.logprobs, scored.ref_logprobs, args.kl_estimator)
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
        normalized_scores = None
        if args.reward_granularity == "token" and scored.coherent_reward is not None:
            # Appendix E: the (per-token clipped) reward at every token; the missing-EOS penalty alone lands on the
            # last token.
            rewards = ppo_math.shape_rewards(
                scored.eos_penalty, kl, mask, args.kl_coef, token_scores=scored.token_scores
            )
        else:
            scores = scored.scores
            if args.normalize_reward:
                scores = normalized_scores = self._normalize_reward(scores)
            rewards = ppo_math.shape_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = self._whiten(rewards, mask, shift_mean=False)
        values, first_forward = scored.values, scored.first_forward
        advantages, returns = ppo_math.compute_gae(rewards, values, mask, args.gamma, args.lam)
        if args.value_bias_init and not self._value_bias_initialized:
            shift = self._init_value_bias(rewards, values, mask)
            values = (values + shift) * mask
            if first_forward is not None:  # its graph gives the same gradients as a forward with the new bias
                logprobs, first_values, entropy = first_forward
                first_forward = (logprobs, first_values + shift, entropy)
            advantages, returns = ppo_math.compute_gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        buffer = dataclasses.replace(
            scored,
            values=values,
            first_forward=first_forward,
            normalized_scores=normalized_scores,
            kl=kl,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )
        self._check_finite(buffer, ("scores", "logprobs", "ref_logprobs", "values", "advantages", "returns"))
        return buffer

    def _normalize_reward(self, scores: torch.Tensor) -> torch.Tensor:
        """`normalize_reward`: merge this buffer's scores (all processes) into the running moments, then return
        `(scores - mean) / std` by the updated moments, so the first buffer is normalised by its own statistics.

        OpenRLHF's `normalize_reward` divides the reward model's output by a mean and std fixed when the reward model
        was trained, before the KL penalty; the coherent reward has no such training, so we follow TRL's former
        `PPOTrainer` (`use_score_norm`, `RunningMoments`) in using running moments, merged per rollout buffer. Also
        unlike OpenRLHF (which clips after normalising), the score normalised is the one after `reward_clip` and
        `missing_eos_penalty`, so `reward_clip` stays in the reward's own units.
        """
        moments = ppo_math.masked_moments(scores, torch.ones_like(scores))
        if self.accelerator.num_processes > 1:
            moments = self.accelerator.reduce(moments, "sum")
        buffer = self.state.global_step // self.args.steps_per_rollout
        if self._reward_moments_buffer != buffer:
            self._reward_moments_before, self._reward_moments_buffer = self._reward_moments, buffer
        # else: this buffer is generated again (a resume inside it): merge its new scores into the moments before it.
        self._reward_moments = ppo_math.merge_running_moments(
            self._reward_moments_before, ppo_math.moments_to_running(moments.cpu())
        )
        mean, var = ppo_math.running_mean_var(self._reward_moments)
        metrics = self._metrics["train"]
        metrics["reward_norm/mean"].append(mean.item())
        metrics["reward_norm/std"].append(var.sqrt().item())
        return ppo_math.normalize_scores(scores, mean, var)

    def _init_value_bias(self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`value_bias_init`: shift the critic head's bias by the `c` that makes the buffer's mean value (all
        processes) equal its mean return (`ppo_math.mean_return_offset`); returns `c` (a 0-d tensor on the values'
        device and dtype), by which the caller shifts the values it already has: `c` is a constant, so a kept
        forward's graph gives the same gradients as a forward with the new bias."""
        terms = ppo_math.mean_return_offset_terms(rewards, values, mask, self.args.gamma, self.args.lam)
        if self.accelerator.num_processes > 1:
            terms = self.accelerator.reduce(terms, "sum")
        offset = ppo_math.mean_return_offset(terms)
        bias = self._value_head_bias()
        with torch.no_grad():
            bias.add_(offset.to(bias))
        self._value_bias_initialized = True
        logger.info("value_bias_init: critic head bias shifted by %.4g (mean value = mean return).", offset.item())
        return offset.to(device=values.device, dtype=values.dtype)

    def _value_head_bias(self) -> nn.Parameter | None:
        """The trainable bias of the critic's scalar head (`score` / `classifier`, or PEFT's trained copy of it);
        None when there is not exactly one."""
        from ..models.modeling import value_head_linears

        critic = self._unwrap(self.model).value_model
        biases = [m.bias for m in value_head_linears(critic) if m.bias is not None and m.bias.requires_grad]
        return biases[0] if len(biases) == 1 else None

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`ppo_math.masked_whiten` with the mean and variance of the whole rollout buffer, across all processes
        (OpenRLHF's replay buffer normalises advantages the same way): each process whitening its own shard would
        give every shard mean 0, whatever its rewards."""
        moments = ppo_math.masked_moments(values, mask)
        if self.accelerator.num_processes > 1:
            moments = self.accelerator.reduce(moments, "sum")
        mean, var = ppo_math.moments_to_mean_var(moments)
        return ppo_math.masked_whiten(values, mask, shift_mean=shift_mean, mean=mean, var=var)

    def _check_finite(self, tensors: RolloutBuffer, keys) -> None:
        """Raise `FloatingPointError` naming the step, the tensor and the rollout-buffer rows that are NaN or inf.

        Every process takes part (one all-reduce), so all of them stop together when one of them sees a bad value.
        """
        problems = []
        for key in keys:
            tensor = getattr(tensors, key)
            bad = (~torch.isfinite(tensor)).reshape(len(tensor), -1).any(-1).nonzero().flatten()
            if len(bad):
                problems.append(f"{key} in rows {bad.tolist()[:8]}")
        if self._any_process(bool(problems)):
            where = "; ".join(problems) if problems else "on another process"
            raise FloatingPointError(
                f"Non-finite values at optimizer step {self.state.global_step} of the rollout buffer ({where}): "
                "check the reward and reference models (dtype overflow, NaN weights) or lower the learning rate."
            )

    def _any_process(self, flag: bool) -> bool:
        """True when `flag` is True on any process (a no-op on one process)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
        return bool(total.item() > 0)

    # ------------------------------------------------------------------ helpers of the PPO update

    def _reset_actor_optimizer_state_at_first_actor_step(self) -> None:
        """At the first actor update after a critic warm-up, start the actor's optimizer state afresh.

        Under DDP the actor's parameters get no gradient during the warm-up and AdamW skips them, so its first update
        is a fresh Adam step. DeepSpeed's flat partitions (and FSDP1's flat parameters) hold zero gradients instead:
        AdamW steps the actor's state, its step count grows while its moments stay 0, and the bias correction would
        then scale the actor's first updates by 0.6x (2 warm-up steps) to 1.6-3.3x (the paper's 35 buffers of 8 steps)
        a fresh step. Forgetting that state makes the first actor update a fresh Adam step on every engine. Done once,
        at the first micro-step of that optimizer step, also when a resume starts there (the checkpoint holds the
        warm-up's state).
        """
        warmup = self.args.critic_warmup_steps * self.args.steps_per_rollout
        if warmup == 0 or self.state.global_step != warmup or self._actor_state_reset_at == warmup:
            return
        self._actor_state_reset_at = warmup
        if self.optimizer is None or not reset_optimizer_state(self.optimizer, role="actor"):
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                logger.warning(
                    "Could not reset the actor's optimizer state after the critic warm-up (an optimizer from the "
                    "DeepSpeed config or passed in, without actor and critic parameter groups, or DeepSpeed's "
                    "optimizer state swapped to NVMe): the actor's first updates are scaled by Adam's bias correction "
                    "of the warm-up steps. Leave the optimizer to SRPPOTrainer to avoid it."
                )

    def _critic_parameters(self) -> list[nn.Parameter]:
        return list(self._unwrap(self.model).value_model.parameters())


def _optimizer_chain(optimizer) -> list:
    """`optimizer` and the optimizers it wraps (accelerate's wrapper, DeepSpeed's ZeRO optimizer), outermost first; the
    last one is the optimizer holding the state (`torch.optim.Optimizer`, DeepSpeed's CPU Adam, ...)."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and chain[-1].optimizer not in chain:
        chain.append(chain[-1].optimizer)
    return chain


def _params_holding_state(chain: list) -> list[tuple[dict, object]]:
    """(parameter group of the innermost optimizer, tensor its state is keyed by) for every stateful tensor.

    A torch optimizer (DDP, FSDP, one process) and DeepSpeed ZeRO-1/2 (one flat fp32 partition per group, kept in the
    group) key their state by the tensors of each group. ZeRO-3 empties the groups between steps and keys the state
    by its flat fp32 sub-groups, each of one parameter group (`sub_group_to_group_id`).
    """
    inner = chain[-1]
    zero3 = next((o for o in chain if hasattr(o, "fp32_partitioned_groups_flat")), None)
    if zero3 is None:
        return [(group, param) for group in inner.param_groups for param in group["params"]]
    groups = inner.param_groups
    return [
        (groups[zero3.sub_group_to_group_id[index]], flat)
        for index, flat in enumerate(zero3.fp32_partitioned_groups_flat)
    ]


def reset_optimizer_state(optimizer, role: str) -> bool:
    """Forget the optimizer state (step counts and moments) of the parameter groups whose `"srppo_role"` is `role`, so
    that their next update is the optimizer's first. Returns False when it cannot: no group carries that role, or
    DeepSpeed keeps the state on NVMe.

    The state entries are dropped, as if the parameters had never been stepped: torch optimizers and DeepSpeed's CPU
    Adam build them again at the next step. A step count kept in the group (DeepSpeed's FusedAdam) is dropped too.
    """
    chain = _optimizer_chain(optimizer)
    inner = chain[-1]
    if not any(group.get("srppo_role") == role for group in inner.param_groups):
        return False
    if any(getattr(o, "swap_optimizer", False) for o in chain):
        return False  # DeepSpeed swaps the state to NVMe: it is not in `state` to drop
    stateful = [inner] + [o.backup_optimizer for o in chain if getattr(o, "backup_optimizer", None) is not None]
    for group, param in _params_holding_state(chain):
        if group.get("srppo_role") == role:
            for opt in stateful:
                opt.state.pop(param, None)
    for opt in stateful:
        for group in opt.param_groups:
            if group.get("srppo_role") == role:
                group.pop("step", None)
    return True


def lr_schedule_lambda(args, num_training_steps: int):
    """The multiplier function (step -> factor of the peak lr) of `args.lr_scheduler_type` over `num_training_steps`,
    or None for schedules that are not a `LambdaLR` (e.g. reduce_lr_on_plateau)."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=probe,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or len(scheduler.lr_lambdas) != 1:
        return None
    return scheduler.lr_lambdas[0]
