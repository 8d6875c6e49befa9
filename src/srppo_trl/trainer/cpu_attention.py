"""bf16 attention on a CPU: PyTorch's flash forward, with its backward run in fp32 on short sequences.

PyTorch's CPU flash-attention backward in bf16 splits the queries into blocks of 32 rows when there are fewer than 192
of them, and runs five small bf16 matrix products per block, head and sequence. Each is a separate BLAS call with a
fixed cost, so on short sequences the bf16 backward takes several times its forward and is slower than the same
backward in fp32 (`benchmarks/bench_cpu_attention.py` measures both on the machine at hand). `fp32_attention_backward`
keeps the bf16 forward as it is (the same kernel, so the same outputs bit for bit) and runs the backward on fp32
copies of its inputs, of the forward's output and of its log-sum-exp: the same kernel in fp32, whose gradients are
closer to fp32 attention's than the bf16 kernel's (the benchmark prints both errors). From 192 queries on, PyTorch's
blocks are larger and its bf16 backward is the faster one, so those calls are left alone, as is everything else:
GPUs, fp32 and fp16, dropout, grouped-query attention inside the kernel, calls without gradients, and any call
PyTorch would not send to its flash kernel.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend


# PyTorch's CPU flash kernel uses 32-row query blocks below this many queries (64 and 256 from here on).
SHORT_QUERY_LENGTH = 192

_lock = threading.Lock()
_depth = 0
_original_sdpa = None


class _FlashForwardFp32Backward(torch.autograd.Function):
    """`aten._scaled_dot_product_flash_attention_for_cpu` forward; its backward on fp32 copies of the same tensors."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )
        ctx.save_for_backward(query, key, value, attn_mask, out, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: PyTorch's kernel has no double backward either
            raise RuntimeError(
                "The fp32 attention backward of bf16 CPU runs has no double backward (create_graph=True); set "
                "cpu_attention_fp32_backward=False to use PyTorch's attention."
            )
        query, key, value, attn_mask, out, logsumexp = ctx.saved_tensors

        def fp32(t):
            return None if t is None else t.float()

        with torch.autocast("cpu", enabled=False):
            grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                fp32(grad_out),
                fp32(query),
                fp32(key),
                fp32(value),
                fp32(out),
                logsumexp,  # fp32 already
                0.0,
                ctx.is_causal,
                attn_mask=fp32(attn_mask),
                scale=ctx.scale,
            )
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None, None


def _cpu_autocast_dtype():
    """The dtype CPU autocast runs `scaled_dot_product_attention` in (casting fp32 inputs to it), None when off."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _as_autocast_casts(tensors, autocast: bool):
    """`tensors` as the attention kernel gets them: under bf16 autocast, fp32 ones cast to bf16 (autocast's cast)."""
    if not autocast:
        return tensors
    return [t.to(torch.bfloat16) if t is not None and t.dtype == torch.float32 else t for t in tensors]


def _may_take_fp32_backward(query, key, value, attn_mask, dropout_p, enable_gqa, autocast: bool) -> bool:
    """The cheap part of the choice, before any cast: bf16 (as the kernel will see it) CPU tensors, one of them
    trained, under `SHORT_QUERY_LENGTH` queries, no dropout, no grouped-query attention inside the kernel."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors) or enable_gqa or dropout_p != 0.0:
        return False
    if not any(t.requires_grad for t in tensors) or query.dim() != 4 or query.size(-2) >= SHORT_QUERY_LENGTH:
        return False
    kernel_dtypes = (torch.bfloat16, torch.float32) if autocast else (torch.bfloat16,)
    if any(t.device.type != "cpu" or t.dtype not in kernel_dtypes for t in tensors):
        return False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device.type != "cpu" or attn_mask.requires_grad:
            return False  # (a trained bias, say: its gradient is PyTorch's to compute)
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in kernel_dtypes:
            return False
    return True


def _bool_mask_as_additive(attn_mask, dtype):
    """What `scaled_dot_product_attention` hands its kernels for a boolean mask: 0 where True, -inf where False."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
        attn_mask.logical_not(), float("-inf")
    )


def sdpa_with_fp32_backward(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """`torch.nn.functional.scaled_dot_product_attention`, with the fp32 backward where it applies (see module)."""
    original = _original_sdpa
    if original is None or original is sdpa_with_fp32_backward:  # patches undone out of order elsewhere
        original = torch._C._nn.scaled_dot_product_attention
    # First: generation's many calls (no grad) pass straight through. Not inside a compiled graph, nor under an
    # autocast to another dtype than bf16 (its kernel would run in that dtype).
    autocast_dtype = _cpu_autocast_dtype() if torch.is_grad_enabled() else None
    if torch.is_grad_enabled() and autocast_dtype in (None, torch.bfloat16) and not torch.compiler.is_compiling():
        autocast = autocast_dtype is not None
        if _may_take_fp32_backward(query, key, value, attn_mask, dropout_p, enable_gqa, autocast):
            q, k, v, mask = _as_autocast_casts((query, key, value, attn_mask), autocast)
            # Only where PyTorch itself would run its flash kernel (not under an `sdpa_kernel` excluding it, say).
            if q.dtype == k.dtype == v.dtype == torch.bfloat16 and (
                torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal, scale=scale)
                == SDPBackend.FLASH_ATTENTION.value
            ):
                mask = _bool_mask_as_additive(mask, q.dtype)
                return _FlashForwardFp32Backward.apply(q, k, v, mask, is_causal, scale)
    return original(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


@contextmanager
def fp32_attention_backward():
    """While active, `torch.nn.functional.scaled_dot_product_attention` (what transformers' `sdpa` attention calls)
    is `sdpa_with_fp32_backward`. Nested and concurrent uses are counted; the original is back when the last ends.

    Deliberately a patch of the function rather than a transformers attention implementation of our own: a model's
    `attn_implementation` is the user's (and is saved with it), and this changes no forward, only which kernel runs
    the backward of some bf16 CPU calls. Code that imported the function by name before keeps the original.

    The backward of a forward run under it must run under it too when activation checkpointing recomputes that
    forward (non-reentrant checkpointing checks that the recomputation matches): the trainer runs both inside its
    training step. Grouped-query attention that PyTorch computes itself (`enable_gqa=True`, which transformers passes
    when there is no attention mask) keeps PyTorch's backward.
    """
    global _depth, _original_sdpa
    with _lock:
        if _depth == 0:
            _original_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = sdpa_with_fp32_backward
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if F.scaled_dot_product_attention is sdpa_with_fp32_backward:  # not another library's patch since
                    F.scaled_dot_product_attention = _original_sdpa
                _original_sdpa = None
