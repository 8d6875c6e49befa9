"""`SRPPOTrainer`: PPO with a critic on current TRL, rewarded by the coherent reward.

One update reads as a straight line through `make_rollout_buffer`, each phase taking and returning a `RolloutBuffer`
(`rollout.py`: typed fields with their shapes):

    prompts -> generate_rollouts (policy) -> _split_into_micro_batches (and the first micro-batch's loss forward,
    kept) -> score_rollouts (policy + critic in one pass; SFT once for both the KL and the reward; PT) ->
    compute_advantages (KL shaping, score at EOS, GAE) -> log; then `_prepare_inputs` hands its micro-batches to
    compute_loss over num_ppo_epochs x num_mini_batches optimizer steps (clipped policy loss, clipped value loss)

It runs inside `transformers.Trainer`'s own loop, the way TRL's GRPO/RLOO trainers do: the dataloader yields one
rollout batch of prompts, repeated once per micro-step of the buffer; `_prepare_inputs` generates and scores the
buffer at its first micro-step and hands out shuffled micro-batches afterwards. Optimizer, scheduler, gradient
accumulation, logging, checkpoints and resume are the `Trainer`'s. We deliberately differ from TRL's former
`PPOTrainer`, which replaced `train()` with its own loop and so could not resume.

Every `Trainer` method we override is in this class: for the update (`_prepare_inputs`, `training_step`,
`compute_loss`, `create_optimizer`, `create_scheduler`, `_clip_grad_norm`, `log`, `evaluate`, the data loading) and
for saving and resuming (`train`, `_save_checkpoint`, `_save_rng_state`, `_save`, `_load_from_checkpoint`). The
phases and the helpers are in the mixins, which override nothing of the `Trainer`'s: `RolloutMixin` (`rollout.py`),
`ScoringMixin` (`scoring.py`), `PPOStepMixin` (`ppo_step.py`), `CheckpointMixin` (`checkpointing.py`) and
`TRL112CompatMixin` (`trl112_compat.py`, TRL 1.12 `PPOTrainer`'s own API).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import weakref
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, create_model_from_path

from ..data.builders import check_lengths, prompt_input_ids
from ..models.coherent_reward import CoherentRewardModel, check_same_vocabulary
from ..models.coherent_reward import vocab_size as _vocab_size
from ..models.contiguous_lm_head import contiguous_lm_head_input
from ..models.modeling import (
    PolicyAndValueWrapper,
    build_value_model,
    check_value_model,
    critic_peft_config,
    disable_dropout,
    is_kbit,
    keep_value_head_in_fp32,
    prepare_kbit,
)
from ..models.single_base import is_single_base
from . import ppo_math
from .checkpointing import (
    VALUE_MODEL_DIR,
    CheckpointMixin,
    checkpoint_to_resume,
    last_complete_checkpoint,
    load_saved_models,
    unmark_complete,
)
from .config import SRPPOConfig
from .cpu_attention import fp32_attention_backward
from .ppo_step import PPOStepMixin, lr_schedule_lambda
from .precision import FrozenWeightCasts, lora_input_casts_skipped
from .rollout import RolloutBuffer, RolloutMixin, response_mask_after_stop, rollout_generation_config
from .scoring import ScoringMixin, _is_reward_function, _is_sequence_classifier
from .trl112_compat import TRL112CompatMixin, _TRL112Callback


logger = logging.getLogger(__name__)


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle is a function of (seed, epoch) alone.

    `RepeatSampler` draws each epoch's permutation from one generator that advances across epochs, so a run resumed
    in epoch e > 0 (a new sampler) would draw epoch 0's permutation again. The Trainer calls `set_epoch` (through
    accelerate's data loader) before iterating, so the resumed run draws the same prompts as an uninterrupted one.
    """

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return super().__iter__()


class SRPPOTrainer(RolloutMixin, ScoringMixin, PPOStepMixin, CheckpointMixin, TRL112CompatMixin, _BaseTrainer):
    """Self-Rewarding PPO (arXiv 2510.21090): PPO with a critic and the coherent reward `log p_SFT - log p_PT`.

    Args:
        args: an [`SRPPOConfig`].
        processing_class: the tokenizer shared by the policy, the reference and the reward models.
        model: the policy, initialised from the SFT model (a loaded causal LM, or a path).
        ref_model: the KL reference, the SFT model. Pass the very object held by the `CoherentRewardModel`
            (`reward_model.sft_model`) - or leave it `None` with a coherent reward - and its log-probabilities are
            computed once per rollout for both the KL and the reward. With a PEFT policy and no reward-held SFT model,
            `None` means "the policy with its adapter disabled".
        reward_model: a [`CoherentRewardModel`], or a sequence-classification reward model with one label (the
            paper's "PPO with a preference reward model" baseline), or a Python reward function with TRL's
            reward-function signature `f(prompts, completions, completion_ids, **kwargs) -> list[float]` (see
            `_reward_function_scores`).
        train_dataset: prompts, either tokenized in an `input_ids` column (used as given, as TRL 1.12's PPO took
            them) or in TRL's prompt-only format: a `prompt` column of plain text or chat messages.
        value_model: the critic; default: the SFT (initial policy) backbone with a scalar head. A one-label
            `*ForTokenClassification` or `*ForSequenceClassification` model (TRL 1.12's critic).
        data_collator: pads a list of `{"input_ids": [...]}` into left-padded `input_ids` (and `attention_mask`)
            tensors; default: the tokenizer's `pad` (TRL 1.12 used `DataCollatorWithPadding`, which does the same).
        eval_dataset: prompts in the same format; `evaluate()` samples responses and reports their reward, and
            `generate_completions()` prints a table of greedy-ish samples.
        optimizers, callbacks: as in `transformers.Trainer`.
        peft_config: a PEFT config; the policy then trains a LoRA adapter.

    The positional order of the arguments is TRL 1.12 `PPOTrainer`'s.
    """

    _tag_names = ["trl", "srppo", "ppo"]
    _name = "SRPPO"
    _paper = {
        "title": "Self-Rewarding PPO: Aligning Large Language Models with Demonstrations Only",
        "id": "2510.21090",
        "citation": (
            "@article{zhang2025srppo,\n  title={Self-Rewarding PPO: Aligning Large Language Models with "
            "Demonstrations Only},\n  author={Zhang, Qingru and others},\n  journal={arXiv preprint "
            "arXiv:2510.21090},\n  year={2025}\n}"
        ),
    }
    # The Trainer divides our loss by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        args: SRPPOConfig | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        model: nn.Module | str | None = None,
        ref_model: nn.Module | str | None = None,
        reward_model: nn.Module | None = None,
        train_dataset: Dataset | None = None,
        value_model: nn.Module | str | None = None,
        data_collator=None,
        eval_dataset: Dataset | None = None,
        optimizers=(None, None),
        callbacks: list[TrainerCallback] | None = None,
        peft_config=None,
    ):
        if model is None:
            raise ValueError("`model` is required: pass the SFT model (or its path) to initialise the policy.")
        if reward_model is None:
            raise ValueError("`reward_model` is required: pass a CoherentRewardModel(sft_model, base_model).")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SRPPOConfig(f"{str(name).split('/')[-1]}-SRPPO")
        init_kwargs = dict(args.model_init_kwargs or {}, trust_remote_code=args.trust_remote_code)

        model_path = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = create_model_from_path(model, **init_kwargs)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model_path or model.config._name_or_path, trust_remote_code=args.trust_remote_code
            )
        self._check_tokenizer(processing_class)
        if args.stop_token == "eos" and args.stop_token_id is None:
            args.stop_token_id = processing_class.eos_token_id

        # Critic first: it copies the SFT weights before PEFT adds adapter layers to the policy.
        built_critic = value_model is None or isinstance(value_model, str)
        if value_model is None:
            source = model_path or model
            if is_kbit(model):  # a quantized policy's packed weights cannot be copied: load the critic the same way
                source = model.config._name_or_path
            value_model = build_value_model(source, _critic_init_kwargs(model, args), args.trust_remote_code)
        elif isinstance(value_model, str):
            value_model = build_value_model(value_model, args.model_init_kwargs, args.trust_remote_code)
        check_value_model(value_model)

        self._check_policy_is_not_frozen_model(model, reward_model, ref_model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(prepare_kbit(model, args), peft_config)
            if built_critic:
                # The critic we build gets a LoRA adapter too (and a trainable head): with a PEFT policy, a full-size
                # critic would cost more memory than everything else (a critic passed in is trained as given).
                value_model = get_peft_model(prepare_kbit(value_model, args), critic_peft_config(peft_config))
        elif not any(p.requires_grad for p in model.parameters()):
            # A copy of the (frozen) SFT model is the usual policy: train all of it, as the user meant.
            logger.warning("No parameter of the policy requires grad (a copy of a frozen model?): unfreezing it.")
            model.requires_grad_(True)
        for module in (model, value_model):
            disable_dropout(module)
        if args.activation_checkpointing:
            model.config.use_cache = False

        self.reward_model = self._check_reward_model(reward_model, model)
        if args.reward_granularity == "token" and not isinstance(self.reward_model, CoherentRewardModel):
            raise ValueError(
                "reward_granularity='token' needs the coherent reward (a log-ratio per token), but this reward model "
                "gives one score per response: use reward_granularity='sequence'."
            )
        self.ref_model, self.ref_is_reward_sft = self._resolve_ref_model(ref_model, model, init_kwargs)
        self._check_tokenizer_fits_models(processing_class, model, self.reward_model, self.ref_model)

        train_dataset = self._prepare_dataset(train_dataset, processing_class, model, args, "train_dataset")
        if len(train_dataset) < args.rollout_batch_size:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts but one rollout buffer needs rollout_batch_size="
                f"{args.rollout_batch_size}: add prompts or lower per_device_train_batch_size, "
                "gradient_accumulation_steps or num_mini_batches."
            )
        if eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, model, args, "eval_dataset")
        self._set_training_length(args, len(train_dataset))
        if args.critic_warmup_steps and args.critic_warmup_steps >= args.num_total_batches:
            logger.warning(
                "critic_warmup_steps=%s covers all %s rollout buffers of this run: only the critic will learn. Train "
                "longer (max_steps, total_episodes) to update the policy after the warm-up.",
                args.critic_warmup_steps,
                args.num_total_batches,
            )
        self._user_collator = data_collator

        super().__init__(
            model=PolicyAndValueWrapper(model, value_model),
            args=args,
            data_collator=self._collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.generation_config = rollout_generation_config(
            max_new_tokens=args.response_length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            pad_token_id=processing_class.pad_token_id,
            stop_token_id=args.stop_token_id,
        )
        self._move_frozen_models()
        # Under DeepSpeed and FSDP the engine owns the weights' dtypes (and keeps fp32 master weights itself).
        keep_value_head_in_fp32(value_model, upcast_weights=not (self.is_deepspeed_enabled or self.is_fsdp_enabled))
        self.vllm_generation, self._vllm_synced_step = None, None
        if args.use_vllm:
            from .vllm_rollout import build_vllm_generation

            self.vllm_generation = build_vllm_generation(self)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._warned_value_clip = False
        self._biased_buffers = 0  # consecutive actor buffers with a critic bias over 10x cliprange_value
        self._buffer: RolloutBuffer | None = None  # the current rollout buffer (B_local rows)
        self._actor_state_reset_at = None  # the global step at which the actor's optimizer state was last reset
        # Checkpointed (`CheckpointMixin._trainer_extra_state`): running [count, mean, m2] of the scores
        # (`normalize_reward`), the moments before the last buffer merged and its index, and `value_bias_init`'s flag.
        self._reward_moments = torch.zeros(3, dtype=torch.float64)
        self._reward_moments_before, self._reward_moments_buffer = None, None
        self._value_bias_initialized = False
        self._check_value_bias_init()
        self._step = None  # micro-steps done, set from `state.global_step` at the first training step (resume)
        self._frozen_weight_casts = self._make_frozen_weight_casts()
        self._fp32_attention_backward = self._uses_fp32_attention_backward()
        self._clock = None  # (time, episode) at the start of `train()`, for the `eps` metric
        self.add_callback(_TRL112Callback(self))

    # ------------------------------------------------------------------ set-up checks

    def _check_value_bias_init(self) -> None:
        if not self.args.value_bias_init:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "value_bias_init is not supported under DeepSpeed or FSDP (the engine keeps its own copy of the "
                "critic's weights): set value_bias_init=False."
            )
        if self._value_head_bias() is None:
            raise ValueError(
                "value_bias_init shifts the bias of the critic's scalar head (`score` / `classifier`), but this "
                "critic's head has no trainable bias: use the default critic or set value_bias_init=False."
            )

    @staticmethod
    def _check_tokenizer(tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token: set `tokenizer.eos_token` so responses can end.")
        if tokenizer.pad_token_id is None:
            logger.warning("The tokenizer has no pad token: using the EOS token for padding.")
            tokenizer.pad_token = tokenizer.eos_token
        # Prompts are left-padded so that every response starts at the same column.
        tokenizer.padding_side = "left"

    @staticmethod
    def _check_tokenizer_fits_models(tokenizer, policy, reward_model, ref_model) -> None:
        """Refuse a tokenizer that emits ids beyond a model's vocabulary (generation would index out of range)."""
        models = {"policy": policy, "ref_model": ref_model}
        if isinstance(reward_model, CoherentRewardModel):
            models.update(sft_model=reward_model.sft_model, base_model=reward_model.base_model)
        elif hasattr(reward_model, "get_input_embeddings"):
            models["reward_model"] = reward_model
        for name, module in models.items():
            if module is None:
                continue
            vocab = _vocab_size(module) if name != "reward_model" else module.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > vocab:
                raise ValueError(
                    f"The tokenizer has {len(tokenizer)} tokens but the {name} has a vocabulary of {vocab}: every "
                    "model must be trained with this tokenizer (if tokens were added, call "
                    "`model.resize_token_embeddings(len(tokenizer))` on the model they were added for)."
                )

    @staticmethod
    def _check_policy_is_not_frozen_model(policy, reward_model, ref_model) -> None:
        frozen = [ref_model]
        if isinstance(reward_model, CoherentRewardModel):
            frozen.append(reward_model.base_model)
            # Single-base mode (`srppo_trl.single_base`): the policy is the reward's PEFT model with its own adapter
            # active; only the "sft" adapter is frozen, so sharing the object is the point, not a mistake.
            if not is_single_base(policy, reward_model):
                frozen.append(reward_model.sft_model)
        if any(policy is m for m in frozen if m is not None):
            raise ValueError(
                "The policy is the very model object used as reference or reward model: training it would move the "
                "frozen reward too. Pass a copy (`copy.deepcopy(sft_model)`) or load the SFT checkpoint again."
            )

    @staticmethod
    def _check_reward_model(reward_model, policy) -> nn.Module:
        if _is_reward_function(reward_model):
            return reward_model
        if isinstance(reward_model, CoherentRewardModel):
            check_same_vocabulary(reward_model.sft_model, policy)
            return reward_model
        config = getattr(reward_model, "config", None)
        if _is_sequence_classifier(reward_model) and getattr(config, "num_labels", None) == 1:
            reward_vocab = getattr(config, "vocab_size", None)
            if reward_vocab is not None and reward_vocab != policy.config.vocab_size:
                raise ValueError(
                    f"The reward model's vocabulary ({reward_vocab} tokens) differs from the policy's "
                    f"({policy.config.vocab_size}): it reads the policy's token ids, so use a reward model built on "
                    "the same tokenizer (re-tokenising text between tokenizers is not supported)."
                )
            reward_model.requires_grad_(False)
            reward_model.eval()
            return reward_model
        raise ValueError(
            f"reward_model is a {type(reward_model).__name__}: pass a CoherentRewardModel (the SRPPO reward), a "
            "sequence-classification reward model with `num_labels=1`, or a reward function "
            "`f(prompts, completions, completion_ids, **kwargs) -> list[float]`."
        )

    def _resolve_ref_model(self, ref_model, policy, init_kwargs):
        coherent = isinstance(self.reward_model, CoherentRewardModel)
        if isinstance(ref_model, str):
            ref_model = create_model_from_path(ref_model, **init_kwargs)
        if ref_model is None and coherent:
            # The KL reference is the SFT model the reward already holds: no copy, and one forward serves both.
            return self.reward_model.sft_model, True
        if ref_model is None:
            if hasattr(policy, "disable_adapter"):
                return None, False  # the policy with its adapter disabled
            # TRL 1.12: a frozen copy of the initial policy (the SFT model) is the KL reference.
            ref_model = copy.deepcopy(policy)
        shared = coherent and ref_model is self.reward_model.sft_model
        if not shared:
            ref_model.requires_grad_(False)
            ref_model.eval()
        return ref_model, shared

    @staticmethod
    def _set_training_length(args: SRPPOConfig, num_prompts: int) -> None:
        """TRL 1.12's length: `total_episodes` prompts (default `num_train_epochs` x the dataset) -> `max_steps`."""
        if args.total_episodes is None and args.max_steps <= 0:
            args.total_episodes = int(args.num_train_epochs * num_prompts)
            args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)
            args.max_steps = args.num_total_batches * args.steps_per_rollout
        elif args.total_episodes is None:
            # max_steps may have been set after the config was built (e.g. `args.max_steps = 2`): derive from it.
            args.num_total_batches = math.ceil(args.max_steps / args.steps_per_rollout)
            args.total_episodes = args.num_total_batches * args.batch_size

    def _move_frozen_models(self) -> None:
        device = self.accelerator.device
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            if _is_reward_function(self.reward_model):
                pass  # a Python function: nothing to place
            elif not isinstance(self.reward_model, CoherentRewardModel):
                self.reward_model = prepare_deepspeed(self.reward_model, self.accelerator)
            elif not self.reward_model.single_base:
                self.reward_model.sft_model = prepare_deepspeed(self.reward_model.sft_model, self.accelerator)
                self.reward_model.base_model = prepare_deepspeed(self.reward_model.base_model, self.accelerator)
            if self.ref_model is not None and not self.ref_is_reward_sft:
                self.ref_model = prepare_deepspeed(self.ref_model, self.accelerator)
            return
        if not _is_reward_function(self.reward_model):
            self.reward_model.to(device)
        if self.ref_model is not None:
            self.ref_model.to(device)

    @staticmethod
    def _prepare_dataset(dataset, tokenizer, model, args, name) -> Dataset:
        if dataset is None:
            raise ValueError(f"{name} is required: a dataset with an `input_ids` or a `prompt` column.")
        # Tokenized prompts (TRL 1.12's format) are used as given; a `prompt` column is tokenized otherwise.
        pretokenized = "input_ids" in dataset.column_names
        if not pretokenized and "prompt" not in dataset.column_names:
            raise ValueError(
                f"{name} has neither an `input_ids` nor a `prompt` column (it has {dataset.column_names}): pass "
                "tokenized prompts in `input_ids`, or prompts in a `prompt` column (plain text or chat messages)."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty: it needs at least one prompt.")

        def tokenize(example):
            ids = prompt_input_ids(example["prompt"], tokenizer)  # BOS-led like SFT and the base model's text
            return {"input_ids": ids, "prompt_length": len(ids)}

        num_proc = getattr(args, "dataset_num_proc", None)
        if pretokenized:
            dataset = dataset.map(_count_prompt_tokens, desc=f"Reading {name}", num_proc=num_proc)
        else:
            dataset = dataset.map(tokenize, desc=f"Tokenizing {name}", num_proc=num_proc)
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        check_lengths(
            dataset["prompt_length"],
            max_prompt_length=args.max_prompt_length,
            response_length=args.response_length,
            context=context,
            name=name,
        )
        return dataset

    def _collate(self, features: list[dict]) -> dict:
        """Left-pads the tokenized prompts: {'input_ids', 'attention_mask'} [B, P]."""
        if self._user_collator is not None:
            return self._collate_with_user_collator(features)
        batch = self.processing_class.pad(
            {"input_ids": [f["input_ids"] for f in features]}, padding=True, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _collate_with_user_collator(self, features: list[dict]) -> dict:
        batch = self._user_collator([{"input_ids": f["input_ids"]} for f in features])
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        mask = (input_ids != self.processing_class.pad_token_id).long() if mask is None else torch.as_tensor(mask)
        if (mask[:, -1] == 0).any():
            raise ValueError(
                "The data_collator padded the prompts on the right: responses are appended after the prompts, so "
                "pad on the left (tokenizer.padding_side = 'left')."
            )
        return {"input_ids": input_ids, "attention_mask": mask}

    # ------------------------------------------------------------------ data loading (one rollout batch per micro-step)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids"]

    def _micro_steps_per_rollout(self) -> int:
        return self.args.gradient_accumulation_steps * self.args.steps_per_rollout

    def get_train_dataloader(self):
        # Trainer.get_train_dataloader with a batch of one whole local rollout batch (see `_get_train_sampler`).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self.args.local_rollout_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        # Each rollout batch of prompts is yielded once per micro-step of its buffer; only the first is used to
        # generate, the rest keep Trainer's step counting (and its batch skipping on resume) right. Same as RLOO.
        return EpochSeededRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=1,
            batch_size=self.args.rollout_batch_size,
            repeat_count=self._micro_steps_per_rollout(),
            shuffle=True,
            seed=self.args.seed,
        )

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """Trainer's (accelerate's `skip_first_batches`), with `set_epoch` still reaching the sampler.

        With several processes the sampler sits under `SkipBatchSampler` > `BatchSamplerShard` > `BatchSampler`, one
        wrapper deeper than accelerate's `DataLoaderShard.set_epoch` and the Trainer look: a run resumed mid-epoch
        would draw epoch 0's prompt order. The skipping wrapper is given the sampler, where `set_epoch` finds it.
        """
        resumed = super().get_resumed_dataloader(dataloader, num_batches)
        for wrapper in (getattr(resumed, "batch_sampler", None), getattr(resumed, "sampler", None)):
            sampler = _epoch_seeded_sampler(wrapper)
            if sampler is not None and getattr(wrapper, "sampler", None) is None:
                wrapper.sampler = sampler
        return resumed

    # ------------------------------------------------------------------ the rollout buffer in Trainer's loop

    def _in_critic_warmup(self) -> bool:
        return self.state.global_step // self.args.steps_per_rollout < self.args.critic_warmup_steps

    def make_rollout_buffer(self, batch: dict, reuse_first_forward: bool | None = None) -> RolloutBuffer:
        """One local rollout batch of prompts -> the `RolloutBuffer` PPO trains on, one phase after the other:
        `generate_rollouts` -> `_split_into_micro_batches` -> `score_rollouts` -> `compute_advantages`; then the
        rollout metrics are logged. Override it (or any phase) to inspect or change the buffer.

        `reuse_first_forward` (None: `_reuses_first_forward()`, which is True at the first micro-step of a buffer
        during training with `args.reuse_first_forward`) runs the first micro-batch's policy and critic forward here
        with its graph kept (`buffer.first_forward`): its detached outputs are that micro-batch's old log-probs and
        values, and its PPO loss backpropagates through the same forward instead of running another one. Before the
        first optimizer step of the buffer the two forwards are the same computation, so only a pass is saved.
        """
        if reuse_first_forward is None:
            reuse_first_forward = self._reuses_first_forward()
        buffer = self.generate_rollouts(batch)
        buffer = self._split_into_micro_batches(buffer, reuse_first_forward)
        buffer = self.score_rollouts(buffer)
        buffer = self.compute_advantages(buffer)
        buffer.warmup = self._in_critic_warmup()
        self._log_rollout_metrics(buffer)
        return buffer

    def _split_into_micro_batches(self, buffer: RolloutBuffer, keep_first_forward: bool) -> RolloutBuffer:
        """Sets `micro_batches`: one shuffle of the rows per PPO epoch, each split into micro-batches of
        `per_device_train_batch_size` rows. With `keep_first_forward`, the rows are first put in epoch 0's order, so
        that the first micro-batch is rows [0, micro), and its loss forward is run and kept (`first_forward`); the
        later epochs' orders are mapped to the new row positions, so every micro-batch holds the same rollouts."""
        size, micro = len(buffer.query), self.args.per_device_train_batch_size
        orders = [torch.randperm(size) for _ in range(self.args.num_ppo_epochs)]
        first_forward = None
        if keep_first_forward:
            first = orders[0]
            position = torch.empty_like(first)
            position[first] = torch.arange(size)
            buffer = buffer.select(first)
            orders = [position[order] for order in orders]
            first_forward = self._loss_forward(buffer.select(slice(0, micro)))
        return dataclasses.replace(
            buffer, micro_batches=[order.split(micro) for order in orders], first_forward=first_forward
        )

    def _loss_forward(self, rows: RolloutBuffer):
        """The policy and critic forward of `compute_loss` on one micro-batch: (log-probs, values, entropy), with
        the graph (the model the Trainer trains, in its autocast context)."""
        with torch.enable_grad(), self.compute_loss_context_manager():
            return self._policy_and_values(
                self.model_wrapped, rows.query, rows.query_mask, rows.response, rows.response_mask, True
            )

    def _reuses_first_forward(self) -> bool:
        """Whether the buffer made now keeps its first micro-batch's loss forward: with `args.reuse_first_forward`,
        during training, at the first micro-step of a buffer (a resume inside a buffer starts later: its first
        micro-batch is not trained again), and not under DeepSpeed or FSDP. Their engines follow a forward of the
        wrapped model by its backward with no other pass of the same parameters in between, so a forward's graph is
        not kept across the scoring passes there."""
        if not self.args.reuse_first_forward or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        if self._step is None or not self.model.training:  # a buffer made outside training (or by hand)
            return False
        return self._step % self._micro_steps_per_rollout() == 0

    def _prepare_inputs(self, batch: dict) -> dict:
        """Trainer's hook between the dataloader and `compute_loss`: makes the rollout buffer at its first micro-step
        (or at the first micro-step of a resumed run) and hands out its micro-batches: see `compute_loss`."""
        if not self.model.training:
            return batch
        if self._step is None:
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
        micro_steps = self._micro_steps_per_rollout()
        index = self._step % micro_steps
        if index == 0 or self._buffer is None:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            self._buffer = None  # the last buffer's tensors (and a kept forward never trained) can go
            shared = self._shared_lower_layers()
            if shared is not None:
                shared.clear()
            self._buffer = self.make_rollout_buffer(batch)
        buffer = self._buffer
        per_epoch = micro_steps // self.args.num_ppo_epochs
        rows = buffer.micro_batches[index // per_epoch][index % per_epoch]
        keys = ("query", "query_mask", "response", "response_mask", "logprobs", "values", "advantages", "returns")
        micro = {k: getattr(buffer, k)[rows] for k in keys}
        micro["warmup"] = buffer.warmup
        micro["rows"] = rows  # for error messages
        # The kept forward is handed to the loss once, and only to the micro-batch it was run on.
        micro["first_forward"] = buffer.first_forward if index == 0 else None
        buffer.first_forward = None
        return micro

    def _unwrap(self, model):
        """`accelerator.unwrap_model(model)`, remembered per model object. accelerate walks every submodule at each call
        (looking for compiled regions), and the trainer unwraps its models several times per step, while what a given
        wrapper unwraps to does not change; a different object (a new wrapper) is unwrapped afresh."""
        cache = self.__dict__.setdefault("_unwrapped", {})
        hit = cache.get(id(model))
        if hit is not None and hit[0]() is model and hit[1]() is not None:
            return hit[1]()
        unwrapped = self.accelerator.unwrap_model(model)
        try:
            cache[id(model)] = (weakref.ref(model), weakref.ref(unwrapped))
        except TypeError:  # not weak-referenceable: not remembered
            pass
        return unwrapped

    def _scored_models(self) -> list[nn.Module]:
        """Every model the trainer runs, unwrapped: policy, critic, reward (SFT and PT) and reference model."""
        unwrap = self._unwrap
        model = unwrap(self.model)
        models = [model.policy, model.value_model, self.ref_model]
        reward = unwrap(self.reward_model) if isinstance(self.reward_model, nn.Module) else None
        if isinstance(reward, CoherentRewardModel):
            models += [reward.sft_model, reward.base_model]
        elif reward is not None:
            models.append(reward)
        return [unwrap(m) for m in models if m is not None]

    def _make_frozen_weight_casts(self) -> FrozenWeightCasts | None:
        """The run's cache of low-precision copies of frozen weights (see `FrozenWeightCasts`), or None where
        `cache_frozen_weight_casts` (None: on a CPU) is off, there is no autocast, DeepSpeed/FSDP shard the weights, or
        `torch_compile` is on."""
        args = self.args
        wanted = args.cache_frozen_weight_casts
        if wanted is None:
            wanted = self.accelerator.device.type == "cpu"
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        # Off with torch.compile: a forward patched at every step would make it recompile.
        if not wanted or not (args.bf16 or args.fp16) or sharded or args.torch_compile:
            return None
        return FrozenWeightCasts()

    def _uses_fp32_attention_backward(self) -> bool:
        """Whether the trained passes run the backward of bf16 flash attention in fp32 (`cpu_attention.py`):
        `cpu_attention_fp32_backward` (None: a bf16 run on a CPU), never with `torch_compile` (the patched function
        would be traced into every graph)."""
        args = self.args
        wanted = args.cpu_attention_fp32_backward
        if wanted is None:
            wanted = self.accelerator.device.type == "cpu" and bool(args.bf16)
        return bool(wanted) and not args.torch_compile

    def _contiguous_lm_heads(self):
        """`contiguous_lm_head.contiguous_lm_head_input` over every model the trainer scores with."""
        return contiguous_lm_head_input(self._scored_models())

    def _shared_lower_layers(self):
        """The critic's `SharedLowerLayers` (`build_single_base(..., critic_top_layers=k)`), else None. Not used under
        DeepSpeed or FSDP, whose engines fetch or shard each layer's parameters around its own forward."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        unwrap = self._unwrap
        return getattr(unwrap(unwrap(self.model).value_model), "shared_lower_layers", None)

    @contextmanager
    def _forward_hooks(self):
        """What every training step and evaluation batch runs inside: the contiguous LM-head inputs, with a top-layer
        critic the lower layers shared by the SFT and critic passes (their cache lives for one buffer), and under
        mixed precision on a CPU the frozen weights' low-precision copies (they live for the run), LoRA layers
        that skip PEFT's input cast where autocast would undo it, and (bf16) attention backwards in fp32 on short
        sequences."""
        shared = self._shared_lower_layers()
        casts = self._frozen_weight_casts
        with ExitStack() as stack:
            stack.enter_context(self._contiguous_lm_heads())
            stack.enter_context(shared.installed() if shared is not None else nullcontext())
            if casts is not None:
                models = self._scored_models()
                stack.enter_context(casts.installed(models))
                stack.enter_context(lora_input_casts_skipped(models))
            if self._fp32_attention_backward:
                stack.enter_context(fp32_attention_backward())
            yield

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._reset_actor_optimizer_state_at_first_actor_step()
        try:
            with self._forward_hooks():
                loss = super().training_step(model, inputs, num_items_in_batch)
        except FloatingPointError as exc:
            # Raised by `_check_finite`/`compute_loss` before this micro-step's backward and before the optimizer step.
            checkpoint = self._save_last_good_state()
            raise FloatingPointError(
                f"{exc} Training stopped without stepping the optimizer; the last good state is saved in "
                f"{checkpoint} (resume with `trainer.train(resume_from_checkpoint=...)` once the cause is fixed)."
            ) from exc
        self._step += 1
        shared = self._shared_lower_layers()
        if shared is not None and self._step % self._micro_steps_per_rollout() == 0:
            shared.clear()  # the buffer is done: its rows will not be seen again
        return loss

    # ------------------------------------------------------------------ phase 4: the PPO update (Trainer overrides)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Clipped policy loss + vf_coef * clipped value loss on one micro-batch of the rollout buffer.

        `inputs`: a micro-batch from `_prepare_inputs`: the buffer's `query`, `query_mask`, `response`,
        `response_mask`, `logprobs`, `values`, `advantages` and `returns` at its rows, its `warmup` flag, the `rows`
        themselves, and `first_forward`: the buffer's kept forward on the buffer's first micro-batch, else None.
        During critic warm-up only the value loss is used, so the policy's parameters get no gradient and stay put.
        """
        args = self.args
        mask = inputs["response_mask"].float()
        if inputs.get("first_forward") is not None:
            # The buffer's first micro-batch: the forward that gave its old log-probs and values (see
            # `make_rollout_buffer`) is this loss's forward too.
            logprobs, values, entropy = inputs["first_forward"]
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
        critic = lr_schedule_lambda(self.args, num_training_steps)
        actor = lr_schedule_lambda(self.args, max(num_training_steps - offset, 1))
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

    # ------------------------------------------------------------------ logging

    def _log_rollout_metrics(self, buffer: RolloutBuffer, mode: str = "train") -> None:
        mask = buffer.response_mask.float()
        gather = self.accelerator.gather_for_metrics

        def mean(x):
            return gather(x.detach().float().reshape(-1)).mean().item()

        non_score = -self.args.kl_coef * buffer.kl.sum(-1) if buffer.kl is not None else None
        metrics = self._metrics[mode]
        metrics["objective/scores"].append(mean(buffer.scores))
        if buffer.normalized_scores is not None:
            metrics["objective/normalized_scores"].append(mean(buffer.normalized_scores))
        if buffer.coherent_reward is not None:
            metrics["objective/coherent_reward"].append(mean(buffer.coherent_reward))
        if non_score is not None:
            metrics["objective/kl"].append(mean(buffer.kl.sum(-1)))
            metrics["objective/non_score_reward"].append(mean(non_score))
            metrics["objective/rlhf_reward"].append(mean(buffer.rewards.sum(-1)))
            metrics["objective/entropy"].append(mean(-buffer.logprobs.sum(-1)))
            metrics["val/mean"].append(mean(ppo_math.masked_mean(buffer.values, mask).unsqueeze(0)))
            if mode == "train" and buffer.returns is not None:
                self._log_critic_error(buffer, mask, mean)
        if buffer.sampling_logprobs is not None and buffer.logprobs is not None:
            # vLLM's log-probs of the sampled tokens against the trainer's (teacher-forced, the PPO ratio's old ones).
            diff = (buffer.sampling_logprobs - buffer.logprobs).abs()
            metrics["rollout/sampling_logprob_diff"].append(mean(ppo_math.masked_mean(diff, mask).unsqueeze(0)))
        eos = (buffer.response == self.processing_class.eos_token_id) & mask.bool()
        metrics["val/num_eos_tokens"].append(gather(eos.sum().reshape(1).float()).sum().item())
        metrics["completions/mean_length"].append(mean(mask.sum(-1)))
        metrics["completions/eos_rate"].append(mean(buffer.has_stop))
        metrics["critic_warmup"].append(float(buffer.warmup))

    def _log_critic_error(self, buffer: RolloutBuffer, mask: torch.Tensor, mean) -> None:
        """Logs `val/abs_error` (mean |return - value|), `val/bias` (mean return - value) and `val/returns_spread`
        (mean |return - the buffer's mean return|, each process's own mean: the abs error of a critic that predicts
        that mean everywhere; a useful critic's `val/abs_error` is well below it) per rollout buffer, and
        warns once when the bias exceeds 10x `cliprange_value` on 3 actor buffers in a row (critic warm-up buffers
        do not count: closing that gap is what they are for). The clipped value loss has no gradient once a value
        is `cliprange_value` from its rollout value, so a critic can close at most that much of a bias per buffer.
        A heuristic: with lam=1 a fitted critic still has a large |return - value| (the returns' spread), hence the
        signed bias."""
        clip = self.args.cliprange_value
        error = buffer.returns - buffer.values
        bias = mean(ppo_math.masked_mean(error, mask).unsqueeze(0))  # every process gathers, before any return
        metrics = self._metrics["train"]
        metrics["val/abs_error"].append(mean(ppo_math.masked_mean(error.abs(), mask).unsqueeze(0)))
        metrics["val/bias"].append(bias)
        spread = (buffer.returns - ppo_math.masked_mean(buffer.returns, mask)).abs()
        metrics["val/returns_spread"].append(mean(ppo_math.masked_mean(spread, mask).unsqueeze(0)))
        if buffer.warmup:
            return
        self._biased_buffers = self._biased_buffers + 1 if clip is not None and abs(bias) > 10 * clip else 0
        if self._biased_buffers < 3 or self._warned_value_clip:
            return
        self._warned_value_clip = True
        if self.accelerator.is_main_process:
            logger.warning(
                f"The critic's values have been {abs(bias):.3g} {'below' if bias > 0 else 'above'} the returns on "
                f"average for 3 rollout buffers, over 10x cliprange_value={clip}: the clipped value loss lets a value "
                "move at most cliprange_value per buffer, so the critic catches up slowly. Set cliprange_value=None "
                "or raise it, warm the critic up longer (critic_warmup_steps), or scale the reward."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and "learning_rate" in logs:
            logs.update(self._trl112_progress_metrics(logs))
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample one response per eval prompt and report the reward, KL, length and EOS rate (no training)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (prompts).")
        if "input_ids" not in dataset.column_names:
            dataset = self._prepare_dataset(
                dataset, self.processing_class, self.model.policy, self.args, "eval_dataset"
            )
        model_was_training = self.model.training
        self.model.eval()
        try:
            metrics = self._evaluate_prompts(dataset, metric_key_prefix)
            # Logged in eval mode: `log` picks the metrics of the mode the model is in, so a log in train mode would
            # take (and clear) the training metrics gathered since the last training log.
            self.log(dict(metrics))
        finally:
            self.model.train(model_was_training)
            if self._frozen_weight_casts is not None and not self.is_in_train:
                self._frozen_weight_casts.clear()  # an evaluation outside training keeps no copies
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluate_prompts(self, dataset, metric_key_prefix: str) -> dict[str, float]:
        """Sample and score one response per prompt of `dataset`; the mean of each eval metric, prefixed."""
        for batch in self.get_eval_dataloader(dataset):
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            shared = self._shared_lower_layers()
            try:
                with self._forward_hooks():
                    scored = self.score_rollouts(self.generate_rollouts(batch))
            finally:
                if shared is not None:
                    shared.clear()
            mask = scored.response_mask.float()
            kl = ppo_math.kl_per_token(scored.logprobs, scored.ref_logprobs, self.args.kl_estimator)
            scored.kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
            scores = scored.scores
            if self.args.normalize_reward and self._reward_moments[0] > 0:
                # The training statistics as they are (not updated by evaluation), so that rewards and values are in
                # the same units as in training.
                scores = scored.normalized_scores = ppo_math.normalize_scores(
                    scores, *ppo_math.running_mean_var(self._reward_moments)
                )
            scored.rewards = ppo_math.shape_rewards(scores, scored.kl, mask, self.args.kl_coef)
            self._log_rollout_metrics(scored, mode="eval")
        metrics = {f"{metric_key_prefix}_{k}": sum(v) / len(v) for k, v in self._metrics["eval"].items() if v}
        self._metrics["eval"].clear()
        return metrics

    # ------------------------------------------------------------------ saving and resuming (helpers: checkpointing.py)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the last *complete* checkpoint of `output_dir`, and
        the trainer's own state (reward statistics, `value_bias_init` done) is restored with the Trainer's.

        A run killed while checkpointing leaves an incomplete folder (see `checkpoint_problem`), which is skipped (with
        a warning naming what is wrong) rather than resumed from; an explicit path to one is refused.
        """
        resume_from_checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            self._load_trainer_extra_state(Path(resume_from_checkpoint))
        try:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            if self._frozen_weight_casts is not None:
                self._frozen_weight_casts.clear()  # the copies' memory back once training ends

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, safe against a kill at any moment (see `checkpoint_problem`).

        Saving again into an existing checkpoint folder (a run resumed from an earlier checkpoint writes the later
        ones anew) first removes its `trainer_state.json` (`unmark_complete`): until the new one is written, the folder
        reads as incomplete rather than as a complete checkpoint mixing old and new files.
        """
        if self.args.should_save:
            unmark_complete(Path(self._checkpoint_folder(trial)))
        self.accelerator.wait_for_everyone()  # no process writes into the folder before its old mark is gone
        super()._save_checkpoint(model, trial)

    def _save_rng_state(self, output_dir: str) -> None:
        """`Trainer._save_rng_state` (each process writes its own file), then a barrier.

        The main process writes `trainer_state.json`, the mark of a complete checkpoint, right after this; the
        Trainer does not wait for the other processes' RNG states (nor their DeepSpeed/FSDP shards, written before),
        so a kill could leave a checkpoint that looks complete without them, and the Trainer resumes without a missing
        RNG state silently.
        """
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Replaces `Trainer._save`: the policy (or its adapter) and the tokenizer at the root of `output_dir`, loadable
        with `from_pretrained`; the critic in `value_model/` for checkpoints (and the final model with
        `save_value_model`), all written through a temporary folder renamed into place (`_write_saved_model`), so a
        crash never leaves a half-written model where a finished one was.

        `state_dict` is what `Trainer.save_model` gathered from the wrapped model (the full weights under DeepSpeed
        ZeRO-3 or FSDP, where the unwrapped modules hold only this process's shards): when given, it is what gets
        written."""
        if self.args.should_save:
            self._write_saved_model(output_dir if output_dir is not None else self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Replaces `Trainer._load_from_checkpoint`: loads the policy (full weights or adapter) and the critic saved by
        `_save`, and drops any buffer in progress."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        load_saved_models(unwrapped.policy, unwrapped.value_model, Path(resume_from_checkpoint))
        self._buffer, self._step = None, None
        if self._frozen_weight_casts is not None:
            self._frozen_weight_casts.clear()


def _epoch_seeded_sampler(batch_sampler) -> EpochSeededRepeatSampler | None:
    """The `EpochSeededRepeatSampler` under a chain of batch-sampler wrappers (`.batch_sampler`), if any."""
    while batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", None)
        if isinstance(sampler, EpochSeededRepeatSampler):
            return sampler
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return None


def _critic_init_kwargs(policy, args) -> dict | None:
    """`from_pretrained` kwargs for a critic built next to `policy`: the user's, plus the policy's quantization."""
    kwargs = dict(args.model_init_kwargs or {})
    quantization = getattr(policy.config, "quantization_config", None)
    if is_kbit(policy) and quantization is not None and "quantization_config" not in kwargs:
        kwargs["quantization_config"] = quantization
    return kwargs or None


def _count_prompt_tokens(example: dict) -> dict:
    return {"prompt_length": len(example["input_ids"])}


__all__ = ["VALUE_MODEL_DIR", "RolloutBuffer", "SRPPOTrainer", "last_complete_checkpoint", "response_mask_after_stop"]
