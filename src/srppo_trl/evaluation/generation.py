"""Greedy batched generation for evaluation: chat template, left padding, a progress bar."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.tokenization import tokenize_prompt
from ..trainer.rollout import checkpoint_generation_defaults_ignored, rollout_generation_config


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError("Each prompt must be a string (the user turn) or a list of chat messages {role, content}.")


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
    template (`add_generation_prompt=True`). Prompts are batched by length with left padding; the tokenizer's
    padding side is restored afterwards. Generation stops at the tokenizer's EOS or after `max_new_tokens` tokens;
    no setting of the checkpoint's `generation_config.json` applies. With `return_stopped`, also returns one bool per
    prompt: whether its response ended at EOS (False: truncated at `max_new_tokens`).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set one distinct from EOS before generating.")
    if tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat template; set one before generating.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    # The ids the trainer's rollouts start from: chat template plus the BOS the tokenizer adds to text.
    prompt_ids = [tokenize_prompt(tokenizer, _as_messages(p)) for p in prompts]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    # Greedy decoding with no processor from the checkpoint's generation_config.json (repetition penalty, n-gram
    # bans, ...): every model is evaluated the same way, whatever its folder says.
    generation_config = rollout_generation_config(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, stop_token_id=tokenizer.eos_token_id
    )
    generation_config.do_sample = False
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    responses: list[str | None] = [None] * len(prompt_ids)
    stopped: list[bool | None] = [None] * len(prompt_ids)
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [prompt_ids[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with checkpoint_generation_defaults_ignored(model):
                output = model.generate(**batch, generation_config=generation_config)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            ended = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
            for i, text, end in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended):
                responses[i], stopped[i] = text.strip(), end
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return (responses, stopped) if return_stopped else responses
