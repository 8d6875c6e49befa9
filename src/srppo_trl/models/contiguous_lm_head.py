"""A contiguous input for the LM head in the trainer's scoring and loss passes: the same logits, faster on CPU.

transformers' causal LMs compute `lm_head(hidden[:, -logits_to_keep:])`. That slice of a [B, T, H] tensor cannot be
viewed as a matrix, so `torch.matmul` runs it as a batched matmul against the weight expanded B times (`bmm`),
slower on CPU than the matrix product of a copy of the slice. A forward pre-hook on the output embeddings copies the
(small) slice first; the logits stay bitwise equal. `python benchmarks/bench_contiguous_lm_head.py` times it.

Single-position inputs are left alone: that is every generation step (prefill and decoding score one position), so
sampled tokens do not change at all. On exit the hooks are removed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _contiguous_input(module, args):
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.dim() > 2 and hidden.shape[-2] > 1 and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None


_contiguous_input.leaves_weight_alone = True  # trainer.packed_linear: the head's weight may be packed for generation


@contextmanager
def contiguous_lm_head_input(models):
    """Inside the context, the output embeddings (LM head) of every model in `models` (None entries skipped; a head
    shared by several models is hooked once) copy a non-contiguous input of several positions before their product."""
    heads = {}
    for model in models:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            heads[id(head)] = head
    handles = [head.register_forward_pre_hook(_contiguous_input) for head in heads.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["contiguous_lm_head_input"]
