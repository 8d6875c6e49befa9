"""Batched generation for evaluation: chat template, left padding, a progress bar.

`generate_in_batches` is the one loop over batches that evaluation generates with (greedy answers in
`generate_responses`, sampled responses in `reward_diagnostics.sample_responses`). Sampled batches go through the
trainer's own `rollout.sample_responses`: every sampling field set explicitly and nothing from the checkpoint's
`generation_config.json`, exactly as the rollouts do. Greedy batches go through `greedy_decode`: argmax of the raw
logits, no logits processor at all, and rows leave the batch as soon as they end, which `model.generate` does not do
(a batch there runs until its last row ends).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig

from ..data.tokenization import tokenize_prompt
from ..trainer.rollout import rollout_generation_config, sample_responses


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError("Each prompt must be a string (the user turn) or a list of chat messages {role, content}.")


def evaluation_generation_config(
    max_new_tokens: int, pad_token_id: int, eos_token_id: int | None, temperature: float = 0.0, top_p: float = 1.0
) -> GenerationConfig:
    """Greedy decoding at `temperature` 0, else exactly `softmax(logits / temperature)` (top-p only if asked); stops
    at `eos_token_id`. Every other sampling field at its neutral value (`rollout_generation_config`)."""
    if temperature > 0:
        return rollout_generation_config(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            pad_token_id=pad_token_id,
            stop_token_id=eos_token_id,
        )
    config = rollout_generation_config(
        max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, stop_token_id=eos_token_id
    )
    config.do_sample = False
    return config


def left_padded(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`input_ids`, `attention_mask`) [B, max length] of token-id lists, padded on the left (as generation needs)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def generate_in_batches(
    model,
    prompt_ids: Sequence[Sequence[int]],
    generation_config: GenerationConfig,
    batch_size: int,
    longest_first: bool = False,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[list[int]]:
    """One response per prompt (token-id lists, in input order), `batch_size` left-padded prompts per `generate` call.

    Each response is cut after its first EOS (`generation_config.eos_token_id`, kept); one without EOS has all
    `max_new_tokens` tokens. A greedy config (`do_sample=False`) decodes with `greedy_decode`, every other one with
    the rollouts' `sample_responses`. `longest_first` batches the prompts by decreasing length (less padding; fine for greedy
    decoding, which does not depend on the batching); otherwise in input order, so that sampling with a seeded RNG
    gives the same responses as before. The model's train/eval mode is restored (`rollout.sample_responses`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    order = list(range(len(prompt_ids)))
    if longest_first:
        order.sort(key=lambda i: -len(prompt_ids[i]))
    device = model_device(model)
    # Greedy configs decode with `greedy_decode` (rows leave the batch as they end; the same tokens as `generate`).
    greedy = not generation_config.do_sample and (eos is None or isinstance(eos, int))
    responses: list[list[int]] = [[] for _ in prompt_ids]
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_padded([prompt_ids[i] for i in idx], pad)
        if greedy:
            output = greedy_decode(model, input_ids, attention_mask, generation_config.max_new_tokens, eos)
        else:
            output = sample_responses(
                model, input_ids.to(device), attention_mask.to(device), generation_config, len(idx), pad
            ).tolist()
        for i, row in zip(idx, output):
            responses[i] = row[: row.index(eos) + 1] if eos is not None and eos in row else row
    return responses


def _forward_parameters(model) -> set[str]:
    """The keyword arguments the causal LM under any wrapper (PEFT, DDP) names in its `forward`."""
    inner = model.module if hasattr(model, "module") else model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return set(inspect.signature(inner.forward).parameters)


@torch.no_grad()
def greedy_decode(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int | None
) -> list[list[int]]:
    """Greedy responses (token-id lists, EOS kept when reached) to left-padded prompts, one forward per new token.

    The same tokens as `model.generate(do_sample=False)` with no logits processor, but a row that emits EOS leaves
    the batch (its key/value cache rows are dropped), so each step costs the rows still running: a batch no longer
    runs at full width until its slowest row ends. We differ from `generate` deliberately for this: 0.31x its time on
    SmolLM2-135M on a CPU, same answers (`benchmarks/bench_greedy_eval.py`, docs/benchmarks.md).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    named = _forward_parameters(model)
    cache = DynamicCache(config=model.config)
    cache_kwarg = {"cache": cache} if "cache" in named else {"past_key_values": cache}
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in named else {}
    was_training = model.training
    model.eval()
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **cache_kwarg, **keep_last,
        )  # fmt: skip
        running = torch.arange(input_ids.shape[0], device=device)  # the batch rows still decoding
        next_position = position_ids[:, -1] + 1
        mask = attention_mask
        tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        for step in range(max_new_tokens):
            chosen = out.logits[:, -1].argmax(-1)
            for row, token in zip(running.tolist(), chosen.tolist()):
                tokens[row].append(token)
            if step == max_new_tokens - 1:
                break
            going = (chosen != eos_token_id).nonzero().squeeze(-1) if eos_token_id is not None else None
            if going is not None and len(going) < len(running):
                if len(going) == 0:
                    break
                cache.batch_select_indices(going)
                running, chosen, mask, next_position = running[going], chosen[going], mask[going], next_position[going]
            mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=-1)
            out = model(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position[:, None], use_cache=True,
                **cache_kwarg,
            )  # fmt: skip
            next_position = next_position + 1
    finally:
        model.train(was_training)
    return tokens


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    desc: str = "generating",
    show_progress: bool = True,
    return_stopped: bool = False,
) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy responses (`do_sample=False`) to `prompts`, in input order, special tokens removed.

    Each prompt is a user message string or a list of chat messages; it is rendered with the tokenizer's chat
    template (`add_generation_prompt=True`). Prompts are batched by length with left padding (`greedy_decode`: a row
    leaves its batch when it ends, so large batches cost little); the tokenizer is left as it was. Generation stops
    at the tokenizer's EOS or after `max_new_tokens` tokens; no setting of the checkpoint's `generation_config.json`
    applies. With `return_stopped`, also returns one bool per prompt: whether
    its response ended at EOS (False: truncated at `max_new_tokens`).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set one distinct from EOS before generating.")
    if tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat template; set one before generating.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    # The ids the trainer's rollouts start from: chat template plus the BOS the tokenizer adds to text.
    prompt_ids = [tokenize_prompt(tokenizer, _as_messages(p)) for p in prompts]
    # Greedy decoding with no processor from the checkpoint's generation_config.json (repetition penalty, n-gram
    # bans, ...): every model is evaluated the same way, whatever its folder says.
    config = evaluation_generation_config(max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id)
    rows = generate_in_batches(model, prompt_ids, config, batch_size, True, desc, show_progress)
    responses = [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    stopped = [tokenizer.eos_token_id in row for row in rows]
    return (responses, stopped) if return_stopped else responses
