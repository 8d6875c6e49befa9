"""Rollout generation: sample responses from exactly the distribution whose log-probabilities PPO trains.

PPO's ratio `pi(y) / pi_old(y)`, the KL to the reference and the coherent reward are all computed on the full softmax
`softmax(logits / temperature)`. So the rollouts must be sampled from that very distribution. `transformers` fills
every generation field left unset (`None`) first from the checkpoint's `generation_config.json` and then from library
defaults (`top_k=50`): a `GenerationConfig(top_k=None)` silently samples top-50, and a checkpoint saying
`repetition_penalty=1.3` or `min_new_tokens=8` silently changes the behaviour policy. Here every sampling field is set
explicitly, and the model's own generation config is swapped for a blank one while we generate, so nothing is
inherited. (TRL's former PPOTrainer passed `top_k=0`; its GRPO trainer passes its kwargs again at call time for the
same reason, transformers#42762.)

This module is the place where other rollout engines (vLLM) plug in: `sample_responses` takes prompts and returns
response token ids. It also defines `RolloutBuffer`, the value each phase of an update takes and returns.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig

from ..models.adapter_merge import lora_layers, lora_merged_for_generation
from .packed_linear import linears_packed_for_generation
from .precision import frozen_weights_cast_once
from .sampling import ROLLOUT_SAMPLERS, inverse_cdf_generation


logger = logging.getLogger(__name__)

# Every field that changes the sampling distribution, at its neutral value. `None` is never neutral: it means
# "inherit from the checkpoint". See transformers' `GenerationMixin._get_logits_processor`.
NEUTRAL_SAMPLING_FIELDS = {
    "do_sample": True,
    "num_beams": 1,
    "num_return_sequences": 1,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
}


@dataclass(eq=False)  # compared by identity: `==` on tensors has no single truth value
class RolloutBuffer:
    """One local rollout batch, filled phase by phase: `generate_rollouts` -> `score_rollouts` ->
    `compute_advantages` (`SRPPOTrainer.make_rollout_buffer` runs them in turn), then read by `compute_loss` one
    micro-batch at a time.

    Each phase takes the buffer and returns a copy with its own fields set (`dataclasses.replace`: the tensors are
    shared, not copied). Shapes: B rollouts, P prompt tokens (left-padded), R response tokens (right-padded; the
    padding is where `response_mask` is 0). A field is None until its phase has run, and stays None in the modes that
    do not produce it.

    For code written against the former dict buffer, `buffer["scores"]`, `"scores" in buffer` and `buffer.get(...)`
    read the fields (a field that is None is absent); new code uses the attributes.
    """

    # Phase 1, `generate_rollouts`.
    query: torch.Tensor  # (B, P) prompt token ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, R) sampled token ids, right-padded with the pad token
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first stop token
    has_stop: torch.Tensor  # (B,) bool: the response ended with the stop token (else truncated at R)
    sampling_logprobs: torch.Tensor | None = None  # (B, R) vLLM's log-probs of the sampled tokens (vLLM only)

    # Set by `make_rollout_buffer` before scoring.
    micro_batches: list[list[torch.Tensor]] | None = None  # per PPO epoch, the rows of each micro-batch
    # (log-probs, values, entropy), each (micro, R), of rows [0, micro) with their graph kept: the policy and critic
    # forward of the first micro-batch's loss, run before scoring (`reuse_first_forward`). `score_rollouts` takes
    # those rows' old log-probs and values from it; `compute_loss` backpropagates through it once.
    first_forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # Phase 2, `score_rollouts`.
    logprobs: torch.Tensor | None = None  # (B, R) the policy's log-probs of the response tokens (PPO's old ones)
    values: torch.Tensor | None = None  # (B, R) the critic's values
    ref_logprobs: torch.Tensor | None = None  # (B, R) the KL reference's log-probs
    token_scores: torch.Tensor | None = None  # (B, R) the per-token reward (reward_granularity="token"), else 0
    eos_penalty: torch.Tensor | None = None  # (B,) -missing_eos_penalty where the stop token is missing, else 0
    scores: torch.Tensor | None = None  # (B,) the sequence reward after reward_clip and the missing-EOS penalty
    coherent_reward: torch.Tensor | None = None  # (B,) log p_SFT - log p_PT before clipping (coherent reward only)

    # Phase 3, `compute_advantages`.
    normalized_scores: torch.Tensor | None = None  # (B,) the scores normalised by running moments (normalize_reward)
    kl: torch.Tensor | None = None  # (B, R) the per-token KL estimate to the reference
    rewards: torch.Tensor | None = None  # (B, R) the shaped rewards: -kl_coef * kl plus the score at the last token
    advantages: torch.Tensor | None = None  # (B, R) GAE advantages (whitened with whiten_advantages)
    returns: torch.Tensor | None = None  # (B, R) advantages + values: the critic's targets
    warmup: bool = False  # a critic warm-up buffer: the loss is the value loss alone

    def select(self, rows) -> RolloutBuffer:
        """The buffer of the given rows (an index tensor or a slice) of every per-rollout tensor. The micro-batch
        rows and the kept first forward refer to the whole buffer's rows and are left out."""
        picked = {
            f.name: value[rows]
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return RolloutBuffer(**picked, warmup=self.warmup)

    # Read access by key, for code written against the former dict buffer.

    def __getitem__(self, key: str):
        value = getattr(self, key, None) if key in _BUFFER_FIELDS else None
        if value is None:
            raise KeyError(f"The rollout buffer has no {key!r} (no such field, or this run does not fill it).")
        return value

    def __contains__(self, key: str) -> bool:
        return key in _BUFFER_FIELDS and getattr(self, key) is not None

    def get(self, key: str, default=None):
        return self[key] if key in self else default


_BUFFER_FIELDS = frozenset(f.name for f in dataclasses.fields(RolloutBuffer))


def response_mask_after_stop(responses: torch.Tensor, stop_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens that count: everything up to and including the first stop token.

    Shapes: `responses` [B, R] -> (`mask` [B, R] long, `has_stop` [B] bool). Rows without a stop token (truncated at
    `response_length`) keep all R tokens. Works when the pad token equals the stop token: only the first one counts.
    `stop_token_id=None` (no stop token: every response runs to `response_length`) keeps all tokens of every row.
    """
    if stop_token_id is None:
        no_stop = torch.zeros(len(responses), dtype=torch.bool, device=responses.device)
        return torch.ones_like(responses, dtype=torch.long), no_stop
    is_stop = responses == stop_token_id
    has_stop = is_stop.any(-1)
    first_stop = torch.where(has_stop, is_stop.long().argmax(-1), responses.shape[1] - 1)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions.unsqueeze(0) <= first_stop.unsqueeze(1)).long(), has_stop


def rollout_generation_config(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_token_id: int | None = None,
    stop_token_id: int | None = None,
) -> GenerationConfig:
    """A `GenerationConfig` that samples from `softmax(logits / temperature)`, restricted only by the `top_k`/`top_p`
    the caller asks for, and stops at `stop_token_id` (never, when it is None: every response then has
    `max_new_tokens` tokens, as the trainer's `stop_token=None` promises)."""
    if (top_k or 0) > 0 or (top_p is not None and top_p < 1.0):
        logger.warning(
            "Rollouts sample with top_k=%s / top_p=%s: the behaviour policy is then a truncated softmax, while PPO's "
            "ratio, the KL and the entropy are computed on the full one. Leave them off unless you mean it.",
            top_k,
            top_p,
        )
    fields = dict(NEUTRAL_SAMPLING_FIELDS)
    fields.update(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        pad_token_id=pad_token_id,
        eos_token_id=stop_token_id,
        # SFTTrainer saves `use_cache=False` and activation checkpointing sets it: generating without the KV cache is
        # several times slower. The policy is in eval mode while it generates, so the cache is safe.
        use_cache=True,
    )
    return GenerationConfig(**fields)


def _generation_hosts(model: nn.Module) -> list[nn.Module]:
    """The modules whose `generation_config` `generate` reads (a PEFT model delegates to its base model)."""
    hosts = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        hosts.append(get_base())
    return [h for h in hosts if hasattr(h, "generation_config")]


@contextmanager
def checkpoint_generation_defaults_ignored(model: nn.Module):
    """While inside, `model.generate` sees a blank `GenerationConfig`: nothing from `generation_config.json`."""
    hosts = _generation_hosts(model)
    saved = [h.generation_config for h in hosts]
    try:
        for host in hosts:
            host.generation_config = GenerationConfig()
        yield model
    finally:
        for host, config in zip(hosts, saved):
            host.generation_config = config


def set_training_mode(model: nn.Module, mode: bool, modules: list[nn.Module] | None = None) -> None:
    """`model.train(mode)`. Given `modules` (`list(model.modules())`), the flag of each is set in one flat loop instead:
    `nn.Module.train` recurses through every child with a Python call each, tens of milliseconds for the thousands of
    modules of a LoRA model with several adapters, twice per rollout. The flat loop is taken only where no class in
    the model adds anything to `train` (transformers' `PreTrainedModel.train` only switches a kernels mode when
    `use_kernels` is set); otherwise `model.train(mode)` runs."""
    if modules is None or not all(_plain_train(module) for module in modules):
        model.train(mode)
        return
    for module in modules:
        module.__dict__["training"] = mode  # what nn.Module.train sets, without nn.Module.__setattr__'s checks


def _plain_train(module: nn.Module) -> bool:
    train = type(module).train
    if train is nn.Module.train:
        return True
    from transformers import PreTrainedModel

    return train is PreTrainedModel.train and not getattr(module, "use_kernels", False)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    queries: torch.Tensor,
    query_masks: torch.Tensor,
    generation_config: GenerationConfig,
    chunk_size: int,
    pad_token_id: int,
    return_logprobs: bool = False,
    sampler: str = "multinomial",
    modules: list[nn.Module] | None = None,
):
    """Sample one response per left-padded prompt with `model.generate`, `chunk_size` prompts at a time.

    `sampler`: how each token is drawn from the processed distribution: "multinomial" (transformers' own
    `torch.multinomial`) or "inverse_cdf" (one uniform number per row and step, `trainer.sampling`; the same
    distribution, another use of the random stream, faster on a CPU). `modules`: `list(model.modules())` kept by the
    caller, to switch the model to eval mode and back without a recursive walk (`set_training_mode`).

    Returns `responses` [B, R] (right-padded with `pad_token_id` to the longest chunk), and with `return_logprobs`
    also the behaviour policy's log-probabilities of the sampled tokens [B, R] (log-softmax of the scores
    `generate` sampled from, after every logits processor; 0 on the padding between chunks; after a response's stop
    token the values mean nothing): the check that rollouts come from the distribution the trainer computes.

    Apple's MPS has no float64: there "inverse_cdf" falls back to "multinomial".
    """
    if sampler not in ROLLOUT_SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {ROLLOUT_SAMPLERS}.")
    if sampler == "inverse_cdf" and queries.device.type == "mps":
        logger.info("Rollouts on MPS sample with torch.multinomial: MPS has no float64 for the inverse-CDF sampler.")
        sampler = "multinomial"
    was_training = model.training
    set_training_mode(model, False, modules)
    if return_logprobs and sampler == "multinomial":
        generation_config = copy.deepcopy(generation_config)
        generation_config.return_dict_in_generate = True
        generation_config.output_scores = True
    responses, logprobs = [], []
    try:
        with checkpoint_generation_defaults_ignored(model):
            for start in range(0, len(queries), chunk_size):
                q, m = queries[start : start + chunk_size], query_masks[start : start + chunk_size]
                if sampler == "inverse_cdf":
                    config, processors, drawn = inverse_cdf_generation(generation_config, return_logprobs)
                    response = model.generate(
                        input_ids=q, attention_mask=m, generation_config=config, logits_processor=processors
                    )[:, q.shape[1] :]
                    if return_logprobs:  # one entry per decoding step; steps past the end are dropped
                        picked = torch.stack(drawn.logprobs, dim=1)[:, : response.shape[1]]
                        logprobs.append(torch.nan_to_num(picked, neginf=-torch.inf))
                    responses.append(response)
                    continue
                out = model.generate(input_ids=q, attention_mask=m, generation_config=generation_config)
                sequences = out.sequences if hasattr(out, "sequences") else out  # a caller's return_dict_in_generate
                response = sequences[:, q.shape[1] :]
                responses.append(response)
                if return_logprobs:
                    scores = torch.stack(out.scores, dim=1).float()  # [b, R, V], processed logits
                    picked = torch.log_softmax(scores, dim=-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
                    logprobs.append(torch.nan_to_num(picked, neginf=-torch.inf))
    finally:
        set_training_mode(model, was_training, modules)
    width = max(r.shape[1] for r in responses)
    response = torch.cat([nn.functional.pad(r, (0, width - r.shape[1]), value=pad_token_id) for r in responses])
    if not return_logprobs:
        return response
    logprob = torch.cat([nn.functional.pad(lp, (0, width - lp.shape[1]), value=0.0) for lp in logprobs])
    return response, logprob


def _checkpointing_kwargs(args) -> dict | None:
    """The activation-checkpointing kwargs the Trainer used, to turn it back on the same way after generating."""
    return getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device` right now, or None outside autocast."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class RolloutMixin:
    """`SRPPOTrainer`'s phase 1. Another rollout engine (vLLM) replaces `generate_rollouts`."""

    # ------------------------------------------------------------------ phase 1: generate

    @torch.no_grad()
    def generate_rollouts(self, batch: dict) -> RolloutBuffer:
        """Sample one response per prompt of `batch` (left-padded `input_ids` and `attention_mask`, (B, P)).

        Returns a `RolloutBuffer` with its phase-1 fields: `query`, `query_mask`, `response`, `response_mask` (the
        tokens up to and including the first stop token), `has_stop`, and with vLLM `sampling_logprobs`.
        """
        queries, query_masks = batch["input_ids"], batch["attention_mask"]
        if getattr(self, "vllm_generation", None) is not None:
            return self._vllm_rollouts(queries, query_masks)
        with self._unwrapped_for_generation() as unwrapped:
            # Generation in the autocast of the trained passes (bf16/fp16: accelerate's), so the rollouts are sampled
            # in the precision their log-probs are scored and trained in. The unwrapped policy's own forward is not
            # the prepared model's, which accelerate wraps in autocast: without this it would sample in fp32.
            # A LoRA policy generates with its adapter folded into the base weights (restored exactly after), built
            # directly in the autocast dtype where that is narrower than the weights. In bf16 on a CPU every linear
            # then multiplies by its weight packed for oneDNN once for the rollout (`packed_linear`).
            sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
            merge = self.args.merge_adapters_for_generation and not sharded
            found, params, modules = self._generation_walks(unwrapped.policy)
            with (
                self.accelerator.autocast(),
                lora_merged_for_generation(
                    unwrapped.policy,
                    enabled=merge,
                    dtype=_autocast_dtype(queries.device),
                    buffers=getattr(self, "_frozen_weight_casts", None),  # the merged weights' memory, kept (CPU)
                    found=found,
                ),
                linears_packed_for_generation(  # before the cast below hides which weights are frozen
                    modules,
                    enabled=self.args.pack_linears_for_generation
                    and not sharded
                    and not self.args.torch_compile
                    and queries.device.type == "cpu",
                    rows=min(len(queries), self.args.local_rollout_forward_batch_size),
                    casts=getattr(self, "_frozen_weight_casts", None),
                ),
                frozen_weights_cast_once(unwrapped.policy, enabled=not sharded, params=params),
            ):
                response = sample_responses(
                    unwrapped.policy,
                    queries,
                    query_masks,
                    self.generation_config,
                    self.args.local_rollout_forward_batch_size,
                    self.processing_class.pad_token_id,
                    sampler=self.args.rollout_sampler,
                    modules=modules,
                )
        return self._rollouts(queries, query_masks, response)

    @contextmanager
    def _unwrapped_for_generation(self):
        """The model to generate with. Under DeepSpeed, or with activation checkpointing on, TRL's
        `unwrap_model_for_generation`: under ZeRO-3 the weights are gathered once for the whole generation (TRL 1.12's
        `ds3_gather_for_generation`) instead of layer by layer at every decoding step, and checkpointing is off while
        generating. Otherwise the unwrapped model the trainer remembers (`_unwrap`): TRL's context unwraps afresh and
        asks every module whether it checkpoints (walks over all modules), and has nothing else to do. (A model whose
        checkpointing was turned on outside the trainer's arguments generates correctly either way: transformers
        checkpoints only in training mode, and `sample_responses` generates in eval mode.)"""
        from trl.models.utils import unwrap_model_for_generation

        checkpointing = bool(getattr(self.args, "activation_checkpointing", False)) or bool(
            getattr(self.args, "gradient_checkpointing", False)
        )
        if not self.is_deepspeed_enabled and not checkpointing:
            yield self._unwrap(self.model_wrapped)
            return
        with unwrap_model_for_generation(
            self.model_wrapped,  # the DeepSpeed engine under DeepSpeed (whose ZeRO-3 hooks are lifted), else the model
            self.accelerator,
            gather_deepspeed3_params=getattr(self.args, "ds3_gather_for_generation", True),
            gradient_checkpointing_kwargs=_checkpointing_kwargs(self.args),
        ) as unwrapped:
            yield unwrapped

    def _generation_walks(self, policy: nn.Module):
        """What generation needs from a walk over the policy's modules, found once per policy object rather than at
        each rollout (thousands of modules in single-base mode): its LoRA layers (`adapter_merge.lora_layers`), its
        parameters and its modules."""
        # A module added to the policy after its first rollout (a new adapter) is not in these lists: the LoRA merge
        # leaves it to its own forward, but the eval switch would miss it; the trainer adds none during training.
        memo = getattr(self, "_generation_walks_memo", None)
        if memo is None or memo[0] is not policy:  # the trainer holds its policy for its lifetime anyway
            memo = (policy, lora_layers(policy), list(policy.parameters()), list(policy.modules()))
            self._generation_walks_memo = memo
        return memo[1], memo[2], memo[3]

    def _rollouts(self, queries, query_masks, response, sampling_logprobs=None) -> RolloutBuffer:
        response_mask, has_stop = response_mask_after_stop(response, self.args.stop_token_id)
        return RolloutBuffer(
            query=queries,
            query_mask=query_masks,
            response=response,
            response_mask=response_mask,
            has_stop=has_stop,
            sampling_logprobs=sampling_logprobs,
        )

    def _vllm_rollouts(self, queries, query_masks) -> RolloutBuffer:
        """Phase 1 with vLLM: push the policy's weights if they changed since the last push, then sample. Sets
        `sampling_logprobs`: vLLM's log-probs of the sampled tokens (compared with the trainer's own in the
        `rollout/sampling_logprob_diff` metric)."""
        from .vllm_rollout import vllm_sample

        if self._vllm_synced_step != self.state.global_step:
            self.vllm_generation.sync_weights()
            self._vllm_synced_step = self.state.global_step
            casts = getattr(self, "_frozen_weight_casts", None)
            if casts is not None:  # a push through PEFT's merge_adapter writes the base weights' `.data`
                casts.clear()
        response, sampled = vllm_sample(
            self.vllm_generation, queries, query_masks, self.processing_class.pad_token_id, self.generation_config
        )
        return self._rollouts(queries, query_masks, response, sampling_logprobs=sampled)


__all__ = [
    "RolloutBuffer",
    "RolloutMixin",
    "NEUTRAL_SAMPLING_FIELDS",
    "checkpoint_generation_defaults_ignored",
    "response_mask_after_stop",
    "rollout_generation_config",
    "sample_responses",
]
