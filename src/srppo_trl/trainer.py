"""`SRPPOTrainer`: PPO with a critic on current TRL, rewarded by the coherent reward.

One rollout buffer reads as a straight line through the methods of this class:

    prompts -> generate_rollouts (policy) -> score_rollouts (policy + critic in one pass; SFT once for both the KL and
    the reward; PT) -> compute_advantages (KL shaping, score at EOS, GAE) -> compute_loss over num_ppo_epochs x
    num_mini_batches optimizer steps (clipped policy loss, clipped value loss) -> log

It runs inside `transformers.Trainer`'s own loop, the way TRL's GRPO/RLOO trainers do: the dataloader yields one
rollout batch of prompts, repeated once per micro-step of the buffer; `_prepare_inputs` generates and scores the
buffer at its first micro-step and hands out shuffled micro-batches afterwards. Optimizer, scheduler, gradient
accumulation, logging, checkpoints and resume are the `Trainer`'s. We deliberately differ from TRL's former
`PPOTrainer`, which replaced `train()` with its own loop and so could not resume.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, create_model_from_path, disable_dropout_in_model

from . import ppo_math
from .coherent_reward import CoherentRewardModel, _vocab_size, check_same_vocabulary
from .config import SRPPOConfig
from .data import check_lengths, prompt_input_ids
from .logprobs import gather_logprobs, position_ids_from_attention_mask, sequence_logprobs
from .modeling import PolicyAndValueWrapper, build_value_model, check_value_model
from .rollout import response_mask_after_stop, rollout_generation_config, sample_responses
from .single_base import is_single_base


logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"


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


def _is_sequence_classifier(model: nn.Module) -> bool:
    return hasattr(model, "score") or hasattr(model, "classifier")


def _is_reward_function(reward_model) -> bool:
    """A Python reward callable in TRL's reward-function style (any callable that is not an `nn.Module`)."""
    return callable(reward_model) and not isinstance(reward_model, nn.Module)


class SRPPOTrainer(_BaseTrainer):
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
        if value_model is None:
            value_model = build_value_model(model_path or model, args.model_init_kwargs, args.trust_remote_code)
        elif isinstance(value_model, str):
            value_model = build_value_model(value_model, args.model_init_kwargs, args.trust_remote_code)
        check_value_model(value_model)

        self._check_policy_is_not_frozen_model(model, reward_model, ref_model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        elif not any(p.requires_grad for p in model.parameters()):
            # A copy of the (frozen) SFT model is the usual policy: train all of it, as the user meant.
            logger.warning("No parameter of the policy requires grad (a copy of a frozen model?): unfreezing it.")
            model.requires_grad_(True)
        for module in (model, value_model):
            disable_dropout_in_model(module)
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
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._buffer = None  # the current rollout buffer: a dict of [B_local, ...] tensors
        self._step = None  # micro-steps done, set from `state.global_step` at the first training step (resume)
        self._clock = None  # (time, episode) at the start of `train()`, for the `eps` metric
        self.add_callback(_TRL112Callback(self))

    # ------------------------------------------------------------------ set-up checks

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

    # ------------------------------------------------------------------ phase 1: generate

    @torch.no_grad()
    def generate_rollouts(self, batch: dict) -> dict:
        """Sample one response per prompt from the policy.

        Returns {'query' [B, P], 'query_mask' [B, P], 'response' [B, R], 'response_mask' [B, R], 'has_stop' [B]}:
        the response mask covers the tokens up to and including the first stop token.
        """
        queries, query_masks = batch["input_ids"], batch["attention_mask"]
        policy = self.accelerator.unwrap_model(self.model).policy
        response = sample_responses(
            policy,
            queries,
            query_masks,
            self.generation_config,
            self.args.local_rollout_forward_batch_size,
            self.processing_class.pad_token_id,
        )
        response_mask, has_stop = response_mask_after_stop(response, self.args.stop_token_id)
        return {
            "query": queries,
            "query_mask": query_masks,
            "response": response,
            "response_mask": response_mask,
            "has_stop": has_stop,
        }

    # ------------------------------------------------------------------ phase 2: score

    def _policy_and_values(self, model, query, query_mask, response, response_mask, with_entropy: bool = False):
        """One forward of policy and critic: (log-probs of the response tokens [B, R], values [B, R]), plus with
        `with_entropy` the entropy of the policy's sampling distribution at each response position [B, R] (detached)."""
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        width, context = response.shape[1], query.shape[1]
        logits, values = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1)
        logprobs = gather_logprobs(logits[:, :-1], response, self.args.temperature)
        values = values[:, context - 1 : -1].float()
        if not with_entropy:
            return logprobs, values
        with torch.no_grad():
            shifted = logits[:, :-1].detach()
            entropy = ppo_math.entropy_from_logits(
                shifted if self.args.temperature == 1.0 else shifted / self.args.temperature
            )
        return logprobs, values, entropy

    @torch.no_grad()
    def score_rollouts(self, rollouts: dict) -> dict:
        """Policy log-probs, critic values, reference log-probs and the reward of each rollout.

        Adds 'logprobs', 'values', 'ref_logprobs', 'token_scores' [B, R] and 'scores' [B] (the sequence reward,
        after `reward_clip` and `missing_eos_penalty`). With a coherent reward and `ref_model` its SFT model, the
        SFT log-probs are computed once and serve both the KL reference and the reward.
        """
        chunk = self.args.local_rollout_forward_batch_size
        parts = defaultdict(list)
        for start in range(0, len(rollouts["query"]), chunk):
            piece = {k: v[start : start + chunk] for k, v in rollouts.items()}
            for key, value in self._score_chunk(piece).items():
                parts[key].append(value)
        scored = dict(rollouts)
        scored.update({k: torch.cat(v) for k, v in parts.items()})
        return scored

    def _score_chunk(self, piece: dict) -> dict:
        query, query_mask = piece["query"], piece["query_mask"]
        response, response_mask = piece["response"], piece["response_mask"]
        context = query.shape[1]
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        full_response_mask = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)

        logprobs, values = self._policy_and_values(self.model, query, query_mask, response, response_mask)
        mask = response_mask.float()
        out = {"logprobs": logprobs * mask, "values": values * mask}

        token_scores = None
        if isinstance(self.reward_model, CoherentRewardModel):
            sft = self.reward_model.sft_log_probs(input_ids, attention_mask, full_response_mask)[:, context:]
            base = self.reward_model.base_log_probs(input_ids, attention_mask, full_response_mask)[:, context:]
            token_scores = sft - base
            scores = token_scores.sum(-1)
            out["coherent_reward"] = scores.clone()
        elif _is_reward_function(self.reward_model):
            scores = self._reward_function_scores(query, query_mask, response, response_mask)
            sft = None
        else:
            scores = self._sequence_classifier_scores(input_ids, attention_mask, full_response_mask)
            sft = None

        if self.ref_is_reward_sft and self.args.temperature == 1.0 and sft is not None:
            ref_logprobs = sft  # one SFT forward serves the KL and the reward
        else:
            ref_logprobs = self._reference_logprobs(input_ids, attention_mask, full_response_mask)[:, context:]
        out["ref_logprobs"] = ref_logprobs * mask

        clip = self.args.reward_clip
        token_level = self.args.reward_granularity == "token" and token_scores is not None
        if token_level:
            # Appendix E: every token's reward is clipped on its own; the sequence score is their sum.
            token_scores = token_scores * mask
            if clip is not None:
                token_scores = token_scores.clamp(-clip, clip) * mask
            scores = token_scores.sum(-1)
        elif clip is not None:
            scores = scores.clamp(-clip, clip)
        eos_penalty = torch.zeros_like(scores)
        if self.args.missing_eos_penalty is not None and self.args.stop_token_id is not None:
            eos_penalty = torch.where(piece["has_stop"], eos_penalty, eos_penalty - self.args.missing_eos_penalty)
        out["eos_penalty"] = eos_penalty  # [B], lands on the last token alone
        out["scores"] = scores + eos_penalty
        out["token_scores"] = token_scores * mask if token_level else torch.zeros_like(logprobs)
        return out

    def _reference_logprobs(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        temperature = self.args.temperature
        if self.ref_is_reward_sft:
            with self.reward_model.sft_context() as sft_model:
                return sequence_logprobs(sft_model, input_ids, attention_mask, response_mask, temperature)
        if self.ref_model is None:
            policy = self.accelerator.unwrap_model(self.model).policy
            with self.null_ref_context():
                return sequence_logprobs(policy, input_ids, attention_mask, response_mask, temperature)
        return sequence_logprobs(self.ref_model, input_ids, attention_mask, response_mask, temperature)

    def _reward_function_scores(self, query, query_mask, response, response_mask) -> torch.Tensor:
        """Scores [B] from a reward function called as TRL's GRPO/RLOO trainers call theirs.

        `prompts`: the prompt text as the policy saw it (chat template applied, special tokens kept, padding removed);
        `completions`: the response text up to the stop token, special tokens skipped; `completion_ids`: the response
        token ids up to and including the stop token; plus `trainer_state`. `None` scores (TRL's "not applicable")
        count as 0.
        """
        tokenizer = self.processing_class
        prompts, completions, completion_ids = [], [], []
        for q, qm, r, rm in zip(query, query_mask, response, response_mask):
            ids = r[rm.bool()].tolist()
            prompts.append(tokenizer.decode(q[qm.bool()], skip_special_tokens=False))
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
            completion_ids.append(ids)
        scores = self.reward_model(
            prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=self.state
        )
        if len(scores) != len(prompts):
            raise ValueError(f"The reward function returned {len(scores)} scores for {len(prompts)} completions.")
        scores = [0.0 if s is None else float(s) for s in scores]
        return torch.tensor(scores, dtype=torch.float32, device=response.device)

    def _sequence_classifier_scores(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """Score of a one-label sequence classifier read at the last response token (its EOS), as TRL's PPO did.

        The backbone's hidden states go through the classifier head at that index, so padding (even a pad token equal
        to EOS) never decides where the score is read.
        """
        model = self.reward_model
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        last = ppo_math.last_token_index(response_mask).clamp(min=0)
        picked = hidden[torch.arange(len(hidden), device=hidden.device), last]
        head = model.score if hasattr(model, "score") else model.classifier
        return head(picked).squeeze(-1).float()

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
            rewards = ppo_math.shape_rewards(scored["scores"], kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = self._whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.compute_gae(rewards, scored["values"], mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = self._whiten(advantages, mask)
        scored.update(kl=kl, rewards=rewards, advantages=advantages, returns=returns)
        self._check_finite(scored, ("scores", "logprobs", "ref_logprobs", "values", "advantages", "returns"))
        return scored

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

    def _save_last_good_state(self) -> str:
        """Checkpoint the current weights, optimizer, scheduler and RNG states through the Trainer's machinery.

        Called when a non-finite value stops training: it is raised before any backward pass of the current micro-step
        and before the optimizer step, so the weights are still those of the last good optimizer step. An existing
        complete checkpoint of this step is kept as it is.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=None)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        exists = _is_complete_checkpoint(Path(checkpoint))
        self.accelerator.wait_for_everyone()
        if not exists:
            self.model.zero_grad(set_to_none=True)
            self._save_checkpoint(self.model, trial=None)
        return checkpoint

    # ------------------------------------------------------------------ the rollout buffer in Trainer's loop

    def _in_critic_warmup(self) -> bool:
        return self.state.global_step // self.args.steps_per_rollout < self.args.critic_warmup_steps

    def make_rollout_buffer(self, batch: dict) -> dict:
        """Generate, score and compute advantages for one local rollout batch; log the rollout metrics."""
        rollouts = self.generate_rollouts(batch)
        scored = self.score_rollouts(rollouts)
        buffer = self.compute_advantages(scored)
        buffer["warmup"] = self._in_critic_warmup()
        self._log_rollout_metrics(buffer)
        size, micro = len(buffer["query"]), self.args.per_device_train_batch_size
        # One shuffle per PPO epoch, each split into micro-batches of per_device_train_batch_size rows.
        buffer["order"] = [torch.randperm(size).split(micro) for _ in range(self.args.num_ppo_epochs)]
        return buffer

    def _prepare_inputs(self, batch: dict) -> dict:
        if not self.model.training:
            return batch
        if self._step is None:
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
        micro_steps = self._micro_steps_per_rollout()
        index = self._step % micro_steps
        if index == 0 or self._buffer is None:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            self._buffer = self.make_rollout_buffer(batch)
        per_epoch = micro_steps // self.args.num_ppo_epochs
        rows = self._buffer["order"][index // per_epoch][index % per_epoch]
        keys = ("query", "query_mask", "response", "response_mask", "logprobs", "values", "advantages", "returns")
        micro = {k: self._buffer[k][rows] for k in keys}
        micro["warmup"] = self._buffer["warmup"]
        micro["rows"] = rows  # for error messages
        return micro

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except FloatingPointError as exc:
            # Raised by `_check_finite`/`compute_loss` before this micro-step's backward and before the optimizer step.
            checkpoint = self._save_last_good_state()
            raise FloatingPointError(
                f"{exc} Training stopped without stepping the optimizer; the last good state is saved in "
                f"{checkpoint} (resume with `trainer.train(resume_from_checkpoint=...)` once the cause is fixed)."
            ) from exc
        self._step += 1
        return loss

    # ------------------------------------------------------------------ phase 4: PPO losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Clipped policy loss + vf_coef * clipped value loss on one micro-batch of the rollout buffer.

        During critic warm-up only the value loss is used, so the policy's parameters get no gradient and stay put.
        """
        args = self.args
        mask = inputs["response_mask"].float()
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
        optimizer = super().create_optimizer(model)
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
        roles = [group.get("srppo_role", "actor") for group in optimizer.param_groups]
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

    # ------------------------------------------------------------------ logging

    def _log_rollout_metrics(self, buffer: dict, mode: str = "train") -> None:
        mask = buffer["response_mask"].float()
        gather = self.accelerator.gather_for_metrics

        def mean(x):
            return gather(x.detach().float().reshape(-1)).mean().item()

        non_score = -self.args.kl_coef * buffer["kl"].sum(-1) if "kl" in buffer else None
        metrics = self._metrics[mode]
        metrics["objective/scores"].append(mean(buffer["scores"]))
        if "coherent_reward" in buffer:
            metrics["objective/coherent_reward"].append(mean(buffer["coherent_reward"]))
        if non_score is not None:
            metrics["objective/kl"].append(mean(buffer["kl"].sum(-1)))
            metrics["objective/non_score_reward"].append(mean(non_score))
            metrics["objective/rlhf_reward"].append(mean(buffer["rewards"].sum(-1)))
            metrics["objective/entropy"].append(mean(-buffer["logprobs"].sum(-1)))
            metrics["val/mean"].append(mean(ppo_math.masked_mean(buffer["values"], mask).unsqueeze(0)))
        eos = (buffer["response"] == self.processing_class.eos_token_id) & mask.bool()
        metrics["val/num_eos_tokens"].append(gather(eos.sum().reshape(1).float()).sum().item())
        metrics["completions/mean_length"].append(mean(mask.sum(-1)))
        metrics["completions/eos_rate"].append(mean(buffer["has_stop"]))
        metrics["critic_warmup"].append(float(buffer.get("warmup", False)))

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
        loader = self.get_eval_dataloader(dataset)
        for batch in loader:
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            scored = self.score_rollouts(self.generate_rollouts(batch))
            mask = scored["response_mask"].float()
            kl = ppo_math.kl_per_token(scored["logprobs"], scored["ref_logprobs"], self.args.kl_estimator)
            scored["kl"] = torch.where(mask.bool(), kl, torch.zeros_like(kl))
            scored["rewards"] = ppo_math.shape_rewards(scored["scores"], scored["kl"], mask, self.args.kl_coef)
            self._log_rollout_metrics(scored, mode="eval")
        metrics = {f"{metric_key_prefix}_{k}": sum(v) / len(v) for k, v in self._metrics["eval"].items() if v}
        self._metrics["eval"].clear()
        self.model.train(model_was_training)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ TRL 1.12 PPOTrainer's API

    @contextmanager
    def null_ref_context(self):
        """The policy as KL reference: with `ref_adapter_name` that adapter active, else its adapter disabled.

        Only meaningful for a PEFT policy (with a full policy it does nothing), as in TRL 1.12.
        """
        policy = self.accelerator.unwrap_model(self.model).policy
        is_peft = hasattr(policy, "peft_config")
        ref_adapter = self.args.ref_adapter_name
        with policy.disable_adapter() if is_peft and not ref_adapter else nullcontext():
            if ref_adapter:
                policy.set_adapter(ref_adapter)
            try:
                yield
            finally:
                if ref_adapter:
                    policy.set_adapter(self.args.model_adapter_name or "default")

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False):
        """Sample a response to each eval prompt (temperature 0.01, as TRL 1.12) and show them with their score.

        Prints the first five rows as a table (rich if installed) and logs all of them to wandb / trackio when they
        are in `report_to`. `sampling=True` (the calls during training) stops after the first eval batch. Returns the
        table as a pandas DataFrame (columns `query`, `model response`, `score`), or None without an eval_dataset.
        """
        if self.eval_dataset is None:
            return None
        import pandas as pd
        from accelerate.utils import gather_object

        tokenizer = self.processing_class
        saved_config, was_training = self.generation_config, self.model.training
        greedy = copy.deepcopy(saved_config)
        greedy.temperature, greedy.top_k, greedy.top_p, greedy.do_sample = 0.01 + 1e-7, 0, 1.0, True
        self.generation_config = greedy
        self.model.eval()
        table = defaultdict(list)
        try:
            for batch in self.get_eval_dataloader():
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                scored = self.score_rollouts(self.generate_rollouts(batch))
                queries = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
                responses = [
                    tokenizer.decode(r[m.bool()]) for r, m in zip(scored["response"], scored["response_mask"])
                ]
                table["query"].extend(gather_object(queries))
                table["model response"].extend(gather_object(responses))
                table["score"].extend(self.accelerator.gather_for_metrics(scored["scores"]).float().cpu().tolist())
                if sampling:
                    break
        finally:
            self.generation_config = saved_config
            self.model.train(was_training)
        df = pd.DataFrame(table)
        if self.accelerator.is_main_process:
            _print_table(df.iloc[0:5])
            report_to = self.args.report_to or []
            if "wandb" in report_to:
                import wandb

                if wandb.run is not None:
                    wandb.log({"completions": wandb.Table(dataframe=df)})
            if "trackio" in report_to:
                import trackio

                trackio.log({"completions": trackio.Table(dataframe=df)})
        return df

    def _episode(self) -> int:
        """Prompts sampled so far (TRL 1.12's `state.episode`): every rollout buffer started counts whole."""
        return math.ceil(self.state.global_step / self.args.steps_per_rollout) * self.args.batch_size

    def _trl112_progress_metrics(self, logs: dict) -> dict:
        """`episode`, `eps` (episodes per second), `lr` and `val/ratio_var` under TRL 1.12's names."""
        episode = self._episode()
        self.state.episode = episode
        metrics = {"episode": episode, "lr": logs["learning_rate"]}
        if self._clock is not None:
            elapsed = time.time() - self._clock[0]
            metrics["eps"] = int((episode - self._clock[1]) / elapsed) if elapsed > 0 else 0
        ratios = self._metrics["train"].get("val/ratio") or []
        metrics["val/ratio_var"] = torch.tensor(ratios).var().item() if len(ratios) > 1 else 0.0
        return metrics

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Saves the policy (or its adapter) and the tokenizer at the root of `output_dir`, loadable with
        `from_pretrained`; the critic in `value_model/` for checkpoints (and the final model with `save_value_model`).
        Saving goes through a temporary folder renamed into place, so a crash never leaves a half-written model where
        a finished one was."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        target = Path(output_dir).resolve()
        is_checkpoint = target.name.startswith("checkpoint-")
        # A hidden sibling: Trainer's checkpoint globbing (`checkpoint-*`) never sees it.
        tmp_dir = target.parent / f".{target.name}.srppo-tmp"
        if tmp_dir.exists():
            import shutil

            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        unwrapped.policy.save_pretrained(tmp_dir, safe_serialization=True)
        if is_checkpoint or self.args.save_value_model:
            unwrapped.value_model.save_pretrained(tmp_dir / VALUE_MODEL_DIR, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(tmp_dir)
        # The config as JSON (hub tokens redacted by `to_json_string`); no pickled training_args.bin.
        (tmp_dir / "srppo_config.json").write_text(self.args.to_json_string())
        _replace_dir(tmp_dir, target)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the last *complete* checkpoint of `output_dir`.

        A checkpoint is complete once `trainer_state.json`, which the Trainer writes last, is in it: a run killed
        while checkpointing leaves an incomplete folder, which is skipped (with a warning) rather than resumed from.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint in {self.args.output_dir} to resume from: train from scratch "
                    "(resume_from_checkpoint=None) or pass a checkpoint folder."
                )
        elif resume_from_checkpoint and not _is_complete_checkpoint(Path(resume_from_checkpoint)):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete SRPPOTrainer checkpoint (no trainer_state.json, or no "
                "weights): the run was probably killed while saving it; resume from the previous checkpoint."
            )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Loads the policy (full weights or adapter) and the critic saved by `_save`."""
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        checkpoint = Path(resume_from_checkpoint)
        policy = unwrapped.policy
        if hasattr(policy, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(checkpoint / "adapter_model.safetensors"))
        else:
            _load_pretrained_weights(policy, checkpoint)
        _load_pretrained_weights(unwrapped.value_model, checkpoint / VALUE_MODEL_DIR)
        self._buffer, self._step = None, None


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


def _count_prompt_tokens(example: dict) -> dict:
    return {"prompt_length": len(example["input_ids"])}


def _print_table(df) -> None:
    """Print a DataFrame as a rich table when rich is installed, as plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(df.to_string())
        return
    table = Table(show_lines=True)
    for column in df.columns:
        table.add_column(str(column))
    for _, row in df.iterrows():
        table.add_row(*row.astype(str).tolist())
    Console().print(table)


class _TRL112Callback(TrainerCallback):
    """Keeps `state.episode`, starts the `eps` clock and calls `generate_completions(sampling=True)`.

    As in TRL 1.12: after rollout buffers 1, 1 + f, 1 + 2f, ... with f = max(1, num_total_batches //
    num_sample_generations), once the buffer's optimizer steps are done.
    """

    def __init__(self, trainer: SRPPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        state.episode = self.trainer._episode()
        self.trainer._clock = (time.time(), state.episode)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        state.episode = trainer._episode()
        if args.num_sample_generations <= 0 or trainer.eval_dataset is None:
            return
        if state.global_step % args.steps_per_rollout:
            return
        update = state.global_step // args.steps_per_rollout
        frequency = max(1, (args.num_total_batches or update) // args.num_sample_generations)
        if (update - 1) % frequency == 0:
            trainer.generate_completions(sampling=True)


def _load_pretrained_weights(module: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"No safetensors weights in {folder}: it is not a checkpoint written by SRPPOTrainer.")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )


def _is_complete_checkpoint(folder: Path) -> bool:
    """True for a checkpoint folder holding the Trainer's state (written last) and the policy's weights."""
    weights = any(folder.glob("model*.safetensors")) or (folder / "adapter_model.safetensors").exists()
    return (folder / "trainer_state.json").is_file() and weights


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that is complete (see `_is_complete_checkpoint`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for entry in folder.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            steps.append((int(name[len("checkpoint-") :]), entry))
    for _, entry in sorted(steps, reverse=True):
        if _is_complete_checkpoint(entry):
            return str(entry)
        logger.warning("Skipping %s: incomplete checkpoint (the run was killed while saving it).", entry)
    return None


# Files that make up a saved model: stale ones from an earlier save of another kind (sharded vs. single file, full
# model vs. adapter) are removed so that the folder never mixes two models.
_MODEL_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*", "adapter_config.json")


def _replace_dir(tmp_dir: Path, target: Path) -> None:
    """Put the finished save in `tmp_dir` in place of `target`.

    When `target` does not exist (every new checkpoint) this is one atomic rename. Otherwise (the final model saved
    into an existing `output_dir` that also holds checkpoints and logs) `tmp_dir`'s entries replace same-named ones one
    atomic rename at a time: a crash leaves each file either the old or the new complete one, never a partial file.
    Entries of `target` that `tmp_dir` does not have are kept, except stale model files of an earlier save.
    """
    import shutil

    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, target)
        return
    new_names = {entry.name for entry in tmp_dir.iterdir()}
    stale = {p for pattern in _MODEL_FILE_PATTERNS for p in target.glob(pattern) if p.name not in new_names}
    for entry in tmp_dir.iterdir():
        dest = target / entry.name
        if dest.is_dir():
            old = target / (entry.name + ".old")
            os.replace(dest, old)
            os.replace(entry, dest)
            shutil.rmtree(old)
        else:
            os.replace(entry, dest)
    tmp_dir.rmdir()
    for path in stale:
        path.unlink()


__all__ = ["SRPPOTrainer", "last_complete_checkpoint", "response_mask_after_stop"]
