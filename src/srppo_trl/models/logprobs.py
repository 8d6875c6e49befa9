"""Per-token log-probabilities of given sequences under a causal LM.

Shared by the coherent reward, the reference model and the policy. Two details matter for correctness:

* position ids are derived from the attention mask, so a left-padded prompt gives the same log-probabilities as the
  unpadded one, also for absolute-position models such as GPT-2;
* the log-softmax always runs in fp32, row by row, even when the model runs in bf16/fp16, and only over the positions
  that are asked for. We deliberately differ from TRL's `selective_log_softmax` here, which keeps bf16 inputs in bf16.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
from torch import nn


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`position_ids[b, t]` = number of attended tokens before `t` (padding positions get 0).

    Shapes: `attention_mask` [B, T] (0/1) -> [B, T] long.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log softmax(logits / temperature)[..., tokens]` computed in fp32, one row at a time.

    Shapes: `logits` [B, K, V], `tokens` [B, K] -> [B, K] float32. The fp32 copy of the logits is never larger than
    one row `[K, V]`, so the whole batch's full-vocabulary fp32 logits are never materialised at once.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logits = row_logits.float()
        if temperature != 1.0:
            row_logits = row_logits / temperature
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def first_response_index(response_mask: torch.Tensor) -> int:
    """Smallest column index holding a response token in any row (T if the mask is empty)."""
    cols = response_mask.bool().any(dim=0).nonzero()
    return int(cols[0]) if len(cols) else response_mask.shape[1]


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Log-probability of every token given the tokens before it.

    `out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])` in fp32, 0 where `t` is not a response token (or, with no
    `response_mask`, 0 at `t = 0` and on padding). Shapes: `input_ids`, `attention_mask`, `response_mask` [B, T] ->
    [B, T].

    With a `response_mask`, logits are only computed for the positions from the first response token on
    (`logits_to_keep`), which is where the memory of a forward pass goes for long prompts.
    """
    batch, length = input_ids.shape
    if response_mask is None:
        response_mask = attention_mask.clone()
        response_mask[:, 0] = 0
    start = first_response_index(response_mask)
    if start == 0:
        raise ValueError(
            "A response token sits at position 0: every response needs at least one prompt token before it."
        )
    if start >= length:
        return torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
    kwargs = {}
    keep = length - start + 1  # the logits at positions start-1 .. T-1 predict tokens start .. T
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    ctx = nullcontext() if requires_grad else torch.no_grad()
    with ctx:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
            **kwargs,
        ).logits
        logits = logits[:, -keep:-1]  # [B, T - start, V]
        logps = gather_logprobs(logits, input_ids[:, start:], temperature)
    out = torch.cat([logps.new_zeros(batch, start), logps], dim=1)
    return out * response_mask.to(out.dtype)
