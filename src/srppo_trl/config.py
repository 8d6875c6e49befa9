"""`SRPPOConfig`: the training arguments of `SRPPOTrainer`.

Field names follow TRL's former `PPOConfig` (`kl_coef`, `cliprange`, `vf_coef`, `num_ppo_epochs`, `num_mini_batches`,
...) so its users can switch by changing an import. Batch sizes, in TRL PPO's vocabulary:

    mini batch    = per_device_train_batch_size * gradient_accumulation_steps * num_processes   (one optimizer step)
    rollout batch = mini batch * num_mini_batches                                (prompts generated per rollout buffer)

so the paper's "rollout buffer 1024, train batch 128" is a mini batch of 128 with `num_mini_batches=8`, or equivalently
`rollout_batch_size=1024` (then `num_mini_batches` is derived). Each rollout buffer gives
`num_ppo_epochs * num_mini_batches` optimizer steps; `global_step` counts optimizer steps, as in every `Trainer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trl.trainer.base_config import _BaseConfig

from . import ppo_math


logger = logging.getLogger(__name__)

KL_ESTIMATORS = tuple(ppo_math.KL_ESTIMATORS)
REWARD_GRANULARITIES = ("sequence", "token")


@dataclass
class SRPPOConfig(_BaseConfig):
    r"""Configuration of [`SRPPOTrainer`]. Every field has a `help` string (`--help` on a recipe lists them).

    Defaults are generic, small-scale PPO values; the paper's values (KL 0.2, clip 0.2, critic lr 9e-6, 35 warm-up
    buffers, rollout buffer 1024 / train batch 128, actor lr in {5e-8, 2e-8, 1e-8}) live in the recipes' YAML files.
    """

    # ---- Overridden TrainingArguments defaults ----
    learning_rate: float = field(default=1e-6, metadata={"help": "Learning rate of the policy (actor)."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5); off by default here."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Train in bf16 mixed precision. Defaults to True on a bf16-capable GPU, False otherwise."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer reads the `prompt` column itself."}
    )

    # ---- Model loading ----
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model`/`ref_model`/... are given as paths."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the hub. Off by default: turn on knowingly."}
    )

    # ---- Generation (rollouts) ----
    response_length: int = field(default=128, metadata={"help": "Maximum number of new tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts (0 disables it)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts (1.0 disables it)."})
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Prompts longer than this many tokens are refused with an error (None: the model's context)."
        },
    )
    stop_token: str | None = field(
        default="eos",
        metadata={"help": "Where a response ends: 'eos' (the tokenizer's EOS token) or None (use `stop_token_id`)."},
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Token id that ends a response; set from `stop_token='eos'` when None."}
    )
    local_rollout_forward_batch_size: int = field(
        default=16, metadata={"help": "Micro-batch size of the generation and scoring forward passes."}
    )

    # ---- Reward ----
    reward_granularity: str = field(
        default="sequence",
        metadata={
            "help": "'sequence' (the paper's default): the whole coherent reward at the EOS token. 'token' "
            "(Appendix E ablation): log p_SFT - log p_PT at every token; the paper reports it causes length "
            "degeneration."
        },
    )
    reward_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip the score to [-reward_clip, reward_clip] (per token with token granularity). OpenRLHF, "
            "which the paper built on, clips at 10 by default. None: no clipping."
        },
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of responses truncated at `response_length` without EOS."},
    )

    # ---- PPO ----
    num_ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout buffer."})
    num_mini_batches: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps per PPO epoch (mini batches per rollout buffer). Default 1."},
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per rollout buffer across all processes (paper: 1024). Give it or `num_mini_batches`, "
            "not both; the other is derived."
        },
    )
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (paper: 0.2 or 0.5)."})
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator: 'k1' (log p - log p_ref) or 'k3' ((r - 1) - log r, always >= 0)."},
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO policy ratio clip range."})
    cliprange_value: float | None = field(
        default=0.2,
        metadata={
            "help": "Value clip range around the rollout values, in reward units (None: no value clipping). TRL 1.12 "
            "PPO: 0.2; OpenRLHF (which the paper built on; openrlhf/cli/train_ppo_ray.py --value_clip): 0.5, with "
            "rewards clipped to +-10. A clip caps how far a value moves per buffer: with returns of tens of nats (the "
            "unclipped coherent reward) raise it or set None."
        },
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(
        default=0.95,
        metadata={
            "help": "Lambda of GAE. TRL 1.12 PPO: 0.95; OpenRLHF (openrlhf/cli/train_ppo_ray.py --lambd): 1.0, which "
            "the paper recipes use: with one reward at EOS, lambda < 1 leans on a critic that is still learning."
        },
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (without shifting their mean) before GAE."}
    )
    whiten_advantages: bool = field(
        default=True,
        metadata={
            "help": "Whiten the advantages with the mean and variance of the whole rollout buffer, across all "
            "processes (TRL 1.12 PPO and OpenRLHF's replay buffer both normalise advantages)."
        },
    )

    # ---- Critic ----
    critic_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the critic (paper: 9e-6). None: same as the policy."}
    )
    critic_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Number of rollout buffers during which only the critic learns (paper: 35). Their rollouts train "
            "the critic and are then dropped."
        },
    )
    save_value_model: bool = field(
        default=False,
        metadata={"help": "Also save the critic (in `value_model/`) with the final model. Checkpoints always do."},
    )

    # ---- Filled at runtime (see __post_init__) ----
    mini_batch_size: int | None = field(default=None, metadata={"help": "Derived: prompts per optimizer step."})
    steps_per_rollout: int | None = field(
        default=None,
        metadata={"help": "Derived: optimizer steps per rollout buffer (num_ppo_epochs * num_mini_batches)."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()

        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}.")
        if self.reward_granularity not in REWARD_GRANULARITIES:
            raise ValueError(
                f"reward_granularity must be one of {REWARD_GRANULARITIES}, got {self.reward_granularity!r}."
            )
        if self.response_length < 1:
            raise ValueError(f"response_length must be at least 1 token, got {self.response_length}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ValueError(f"reward_clip must be positive or None, got {self.reward_clip}.")
        if self.cliprange <= 0 or (self.cliprange_value is not None and self.cliprange_value <= 0):
            raise ValueError(
                "cliprange and cliprange_value must be positive (set cliprange_value=None to disable it)."
            )
        if self.num_ppo_epochs < 1:
            raise ValueError(f"num_ppo_epochs must be at least 1, got {self.num_ppo_epochs}.")
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}.")
        if self.stop_token not in ("eos", None):
            raise ValueError(f"stop_token must be 'eos' or None, got {self.stop_token!r}.")

        self.mini_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
        if self.rollout_batch_size is not None and self.num_mini_batches is not None:
            raise ValueError("Set either `rollout_batch_size` or `num_mini_batches`, not both: one is derived.")
        if self.rollout_batch_size is not None:
            if self.rollout_batch_size % self.mini_batch_size != 0:
                raise ValueError(
                    f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by the mini batch "
                    f"per_device_train_batch_size * gradient_accumulation_steps * num_processes "
                    f"({self.mini_batch_size})."
                )
            self.num_mini_batches = self.rollout_batch_size // self.mini_batch_size
        else:
            self.num_mini_batches = 1 if self.num_mini_batches is None else self.num_mini_batches
            if self.num_mini_batches < 1:
                raise ValueError(f"num_mini_batches must be at least 1, got {self.num_mini_batches}.")
            self.rollout_batch_size = self.mini_batch_size * self.num_mini_batches
        self.steps_per_rollout = self.num_ppo_epochs * self.num_mini_batches

        # A checkpoint inside a rollout buffer could not be resumed exactly (the buffer is not saved): keep them on
        # buffer boundaries.
        if self.save_strategy == "steps" and self.save_steps >= 1 and self.save_steps % self.steps_per_rollout:
            rounded = int(-(-self.save_steps // self.steps_per_rollout) * self.steps_per_rollout)
            logger.warning(
                "save_steps=%s is not a multiple of the %s optimizer steps of a rollout buffer: using %s so every "
                "checkpoint falls on a buffer boundary.",
                self.save_steps,
                self.steps_per_rollout,
                rounded,
            )
            self.save_steps = rounded

    @property
    def local_rollout_batch_size(self) -> int:
        """Prompts per rollout buffer on this process."""
        return self.rollout_batch_size // self.world_size
