"""Phases 3 and 4 of a rollout buffer: advantages and the PPO update.

`compute_advantages` shapes the per-token rewards (KL penalty, score at EOS or per token), runs GAE and whitens the
advantages over the whole buffer (all processes); `compute_loss` is the clipped policy loss plus `vf_coef` times the
clipped value loss on one micro-batch (the value loss alone during the critic warm-up). The actor and the critic have
their own parameter groups, learning-rate schedules and gradient clipping, as in OpenRLHF. The math itself is in
`ppo_math.py`. `PPOStepMixin` is a part of `SRPPOTrainer`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import ppo_math


logger = logging.getLogger(__name__)


class PPOStepMixin:
    """`SRPPOTrainer`'s advantage, loss, optimizer, scheduler and gradient-clipping methods."""

    # ------------------------------------------------------------------ phase 3: advantages

    def compute_advantages(self, scored: dict) -> dict:
        """Per-token rewards (KL penalty + score at EOS, or the token-level reward), GAE advantages and returns."""
        args = self.args
        mask = scored["response_mask"].float()
        kl = ppo_math.kl_per_token(scored["logprobs"], scored["ref_logprobs"], args.kl_estimator)
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
        if args.reward_granularity == "token" and "coherent_reward" in scored:
            # Appendix E: the (per-token clipped) reward at every token; the missing-EOS penalty alone lands on the
            # last token.
            rewards = ppo_math.shape_rewards(
                scored["eos_penalty"], kl, mask, args.kl_coef, token_scores=scored["token_scores"]
            )
        else:
            scores = scored["scores"]
            if args.normalize_reward:
                scores = scored["normalized_scores"] = self._normalize_reward(scores)
            rewards = ppo_math.shape_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = self._whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.compute_gae(rewards, scored["values"], mask, args.gamma, args.lam)
        if args.value_bias_init and not self._value_bias_initialized:
            scored["values"] = self._init_value_bias(rewards, scored["values"], mask)
            advantages, returns = ppo_math.compute_gae(rewards, scored["values"], mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        scored.update(kl=kl, rewards=rewards, advantages=advantages, returns=returns)
        self._check_finite(scored, ("scores", "logprobs", "ref_logprobs", "values", "advantages", "returns"))
        return scored

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
        processes) equal its mean return (`ppo_math.mean_return_offset`); returns the buffer's values shifted by `c`.
        The first micro-batch's kept forward (`reuse_first_forward`) is shifted too: `c` is a constant, so its graph
        gives the same gradients as a forward with the new bias."""
        terms = ppo_math.mean_return_offset_terms(rewards, values, mask, self.args.gamma, self.args.lam)
        if self.accelerator.num_processes > 1:
            terms = self.accelerator.reduce(terms, "sum")
        offset = ppo_math.mean_return_offset(terms)
        bias = self._value_head_bias()
        with torch.no_grad():
            bias.add_(offset.to(bias))
        shift = offset.to(device=values.device, dtype=values.dtype)
        if self._reused_forward is not None:
            logprobs, reused_values, entropy = self._reused_forward
            self._reused_forward = (logprobs, reused_values + shift, entropy)
        self._value_bias_initialized = True
        logger.info("value_bias_init: critic head bias shifted by %.4g (mean value = mean return).", offset.item())
        return (values + shift) * mask

    def _value_head_bias(self) -> nn.Parameter | None:
        """The trainable bias of the critic's scalar head (`score` / `classifier`, or PEFT's trained copy of it);
        None when there is not exactly one."""
        from ..models.modeling import value_head_linears

        critic = self.accelerator.unwrap_model(self.model).value_model
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

    def _check_finite(self, tensors: dict, keys) -> None:
        """Raise `FloatingPointError` naming the step, the tensor and the rollout-buffer rows that are NaN or inf.

        Every process takes part (one all-reduce), so all of them stop together when one of them sees a bad value.
        """
        problems = []
        for key in keys:
            bad = (~torch.isfinite(tensors[key])).reshape(len(tensors[key]), -1).any(-1).nonzero().flatten()
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

    # ------------------------------------------------------------------ phase 4: PPO losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Clipped policy loss + vf_coef * clipped value loss on one micro-batch of the rollout buffer.

        During critic warm-up only the value loss is used, so the policy's parameters get no gradient and stay put.
        """
        args = self.args
        mask = inputs["response_mask"].float()
        if inputs.get("reuse_forward") and self._reused_forward is not None:
            # The buffer's first micro-batch: the forward that gave its old log-probs and values (see
            # `make_rollout_buffer`) is this loss's forward too.
            (logprobs, values, entropy), self._reused_forward = self._reused_forward, None
        else:
            logprobs, values, entropy = self._policy_and_values(
                model, inputs["query"], inputs["query_mask"], inputs["response"], inputs["response_mask"], True
            )
        vf_loss, vf_stats = ppo_math.value_loss(
            values, inputs["values"], inputs["returns"], mask, args.cliprange_value
        )
        loss = args.vf_coef * vf_loss
        pg_loss, pg_stats = ppo_math.policy_loss(
            logprobs, inputs["logprobs"], inputs["advantages"], mask, args.cliprange
        )
        if not inputs["warmup"]:
            loss = loss + pg_loss
        if self._any_process(not torch.isfinite(loss).item()):
            rows = inputs.get("rows", torch.arange(len(mask)))
            bad = (~torch.isfinite(logprobs.detach()) | ~torch.isfinite(values.detach())) & mask.bool()
            raise FloatingPointError(
                f"Non-finite loss at optimizer step {self.state.global_step} (policy loss {pg_loss.item()}, value "
                f"loss {vf_loss.item()}; non-finite new log-probs or values in rows "
                f"{rows[bad.any(-1).cpu()].tolist()[:8]} of the rollout buffer): lower the learning rate, or check "
                "the models for NaN weights."
            )
        metrics = self._metrics["train"]
        metrics["loss/policy_avg"].append(pg_loss.item())
        metrics["loss/value_avg"].append(vf_loss.item())
        metrics["policy/approxkl_avg"].append(pg_stats["approxkl"].item())
        metrics["policy/clipfrac_avg"].append(pg_stats["clipfrac"].item())
        metrics["val/clipfrac_avg"].append(vf_stats["clipfrac"].item())
        metrics["val/ratio"].append(pg_stats["ratio"].item())
        metrics["policy/entropy_avg"].append(ppo_math.masked_mean(entropy, mask).item())
        return loss

    def create_optimizer(self, model=None):
        """Trainer's optimizer, its parameter groups split by role: the actor's first, then the critic's at
        `critic_learning_rate`. Each group carries `"srppo_role"` ("actor" or "critic") for the scheduler and the
        gradient clipping."""
        user_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if user_optimizer:
            # An optimizer passed in (`optimizers=(opt, sched)`) is used as given: its groups and its scheduler match.
            logger.warning(
                "Using the optimizer passed in as is: critic_learning_rate and the per-role schedules do not apply."
            )
            return optimizer
        if any("srppo_role" in group for group in optimizer.param_groups):
            return optimizer  # already split (create_optimizer called twice)
        critic_lr = self.args.critic_learning_rate
        critic_ids = {id(p) for p in self._critic_parameters()}
        actor_groups, critic_groups = [], []
        for group in optimizer.param_groups:
            policy_params = [p for p in group["params"] if id(p) not in critic_ids]
            critic_params = [p for p in group["params"] if id(p) in critic_ids]
            if policy_params:
                actor_groups.append({**group, "params": policy_params, "srppo_role": "actor"})
            if critic_params:
                lr = group["lr"] if critic_lr is None else critic_lr
                critic_groups.append({**group, "params": critic_params, "lr": lr, "srppo_role": "critic"})
        optimizer.param_groups.clear()
        for group in actor_groups + critic_groups:
            group.pop("initial_lr", None)  # set again by the scheduler from "lr"
            optimizer.add_param_group(group)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """One learning-rate schedule per role, as in OpenRLHF where actor and critic have their own scheduler.

        The critic's schedule runs over all `num_training_steps`. The actor's starts at its first real update, after
        the `critic_warmup_steps` rollout buffers of critic-only training: its warm-up and decay span the remaining
        steps, and its learning rate is 0 before. (One shared schedule would spend the actor's warm-up and part of its
        decay while it is frozen.) Resume restores both, since they live in one `LambdaLR` whose step count the
        Trainer saves.
        """
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = self.optimizer if optimizer is None else optimizer
        offset = self.args.critic_warmup_steps * self.args.steps_per_rollout
        if not all("srppo_role" in group for group in optimizer.param_groups):
            # Not our optimizer (DeepSpeed's own `optimizer` block, or one passed in): no roles to schedule apart.
            logger.warning(
                "The optimizer's parameter groups are not split into actor and critic (an optimizer from the DeepSpeed "
                "config or passed in): one schedule for all of them, and critic_learning_rate does not apply."
            )
            return super().create_scheduler(num_training_steps, optimizer)
        roles = [group["srppo_role"] for group in optimizer.param_groups]
        critic = _schedule_lambda(self.args, num_training_steps)
        actor = _schedule_lambda(self.args, max(num_training_steps - offset, 1))
        if offset == 0 or critic is None or actor is None:
            if offset and (critic is None or actor is None):
                logger.warning(
                    "lr_scheduler_type=%s has no per-step schedule to shift: the actor's schedule runs during the "
                    "critic warm-up too.",
                    self.args.lr_scheduler_type,
                )
            return super().create_scheduler(num_training_steps, optimizer)

        def actor_lambda(step: int) -> float:
            return 0.0 if step < offset else actor(step - offset)

        lambdas = [actor_lambda if role == "actor" else critic for role in roles]
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        self._created_lr_scheduler = True
        return self.lr_scheduler

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
        return list(self.accelerator.unwrap_model(self.model).value_model.parameters())

    def _clip_grad_norm(self, model):
        """Clip the actor's and the critic's gradients to `max_grad_norm` each (OpenRLHF clips each model on its own):
        one joint norm would let the critic's large early gradients shrink the actor's step. Returns the actor's
        pre-clip norm (logged as `grad_norm`); the critic's is logged as `critic/grad_norm`.

        Under DeepSpeed (which clips inside its engine) and FSDP (whose sharded norm spans the wrapped module) we keep
        their joint clipping.
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        critic_ids = {id(p) for p in self._critic_parameters()}
        actor = [p for p in model.parameters() if id(p) not in critic_ids and p.grad is not None]
        critic = [p for p in model.parameters() if id(p) in critic_ids and p.grad is not None]
        max_norm = self.args.max_grad_norm
        zero = torch.zeros((), device=self.accelerator.device)
        actor_norm = nn.utils.clip_grad_norm_(actor, max_norm) if actor else zero
        critic_norm = nn.utils.clip_grad_norm_(critic, max_norm) if critic else zero
        self._metrics["train"]["critic/grad_norm"].append(float(critic_norm))
        return actor_norm


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


def _schedule_lambda(args, num_training_steps: int):
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
