"""bf16 rollouts on a CPU with every linear weight of the policy packed for oneDNN once per rollout, not at every step.

At each decoding step a linear layer multiplies one row per response by its whole weight. On a CPU, PyTorch's bf16
`F.linear` hands oneDNN the weight in PyTorch's row-major layout at every call; oneDNN's own blocked layout, made once
with `torch.ops.mkldnn._reorder_linear_weight` and multiplied with `torch.ops.mkldnn._linear_pointwise` (the pair
PyTorch's own Inductor uses for frozen CPU linears), makes those small products faster: the linears of a SmolLM2-135M
decoding step took 0.67x the time for 8 responses (0.72x for one, 0.73x for a prefill of 312 tokens) on an AMX CPU
(`python benchmarks/bench_packed_linear.py`), with the same outputs bit for bit on one thread; on two threads the
decoding steps' outputs were the same bits and the prefill's were not (oneDNN splits that product differently), so
multi-threaded runs then sample other tokens than unpacked ones, from the same distribution up to the last bit. A rollout packs each weight once
(about 1.2 ns per weight there) and every decoding step reuses it. (With a bias and a non-contiguous input,
`F.linear` rounds the product before adding the bias; the packed product rounds once, as `F.linear` does for a
contiguous input.)

Only the policy's generation (under `torch.no_grad()`), only bf16 (bf16 autocast, or bf16 weights without autocast;
never under fp16 autocast), only on a CPU with oneDNN's bf16 support, and only layers whose forward is
`F.linear(x, weight, bias)`: plain `nn.Linear` layers whose weight no forward pre-hook recomputes (their forward
hooks still run around the packed product), the trainer's cast of frozen weights (`FrozenWeightCasts`), and LoRA
layers that generation runs as their merged base linear (`adapter_merge`). The weight a layer is packed from is the
one it would compute with: a bf16 weight as it is, an fp32 weight under bf16 autocast cast as autocast casts it (a
frozen one from the trainer's cache of casts, packed once for the run). An input that is not what the packed product
expects (another dtype outside autocast, extra arguments, gradients on) goes to the layer's own forward. fp32 is left
alone: MKL's packed sgemm changes the results in the last bits and takes several times the weights' memory for its
packed copies.

Order of contexts (as the trainer enters them): autocast, then `lora_merged_for_generation` (the merged weights are
what gets packed; a LoRA layer whose base is already packed is not merged), then this one, then
`frozen_weights_cast_once` (which marks frozen weights as requiring grad, hiding which ones are frozen).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..models.adapter_merge import runs_as_plain_linear


logger = logging.getLogger(__name__)


def packing_available(device: torch.device | str = "cpu") -> bool:
    """True when bf16 linears on `device` can run on packed weights: a CPU with oneDNN and its bf16 support."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return (
            hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
            and bool(ops._is_mkldnn_bf16_supported())
        )
    except (AttributeError, RuntimeError):  # another PyTorch build without these ops
        return False


def pack_weight(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """`weight` ([out, in], bf16, on the CPU) in oneDNN's layout for products with about `rows` input rows."""
    with torch.no_grad():
        if rows:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the bf16 `x` and the packed bf16 `weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _cpu_autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _packed_weight_and_bias(linear: nn.Linear, rows: int | None, casts):
    """`linear`'s weight packed and its bias, both as it computes with them right now in bf16 on the CPU, or None
    when it does not compute in bf16 there."""
    weight, bias = linear.weight, linear.bias
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    autocast_dtype = _cpu_autocast_dtype()
    if autocast_dtype not in (None, torch.bfloat16):  # fp16 autocast: F.linear computes in fp16
        return None
    autocast = autocast_dtype is not None
    if bias is not None and bias.dtype != torch.bfloat16:
        if not autocast:
            return None
        bias = bias.detach().to(torch.bfloat16)  # as autocast casts it
    if weight.dtype == torch.bfloat16:  # a bf16 model, or a merged LoRA weight swapped in for generation
        return pack_weight(weight, rows), bias
    if weight.dtype != torch.float32 or not autocast:
        return None
    # A frozen weight: packed once for the run, from its bf16 copy (see the order of contexts above).
    if casts is not None and not weight.requires_grad:
        return casts.packed(weight, torch.bfloat16, rows), bias
    return pack_weight(weight.detach().to(torch.bfloat16), rows), bias  # the cast autocast makes, packed


def _computes_plain_linear(module: nn.Module) -> bool:
    """True when `module` is an `nn.Linear` whose forward is `F.linear(x, weight, bias)` (the class's, or the
    trainer's cast of frozen weights), run by no accelerate hook (offloading, device maps), whose weight no forward
    pre-hook recomputes: pre-hooks (pruning, the old `weight_norm`, ...) make it unpackable, unless marked
    `leaves_weight_alone` (the trainer's contiguous LM-head input). Forward hooks run around whatever forward it has."""
    own_forward = module.__dict__.get("forward")
    return (
        type(module) is nn.Linear
        and (own_forward is None or getattr(own_forward, "casts_frozen_weight", False))
        and not hasattr(module, "_hf_hook")
        and all(getattr(hook, "leaves_weight_alone", False) for hook in module._forward_pre_hooks.values())
    )


def _targets(modules: list[nn.Module]) -> list[tuple[nn.Module, nn.Linear]]:
    """(module whose forward to replace, the linear it computes) for every packable layer of `modules`: LoRA layers
    run as their merged, plain base linear (their base is not called, so not packed itself), the base linears of
    other LoRA layers, and plain linears outside adapters. The adapters' own small linears (`lora_A`, `lora_B`, of
    every adapter, active or not) are left alone: packing them would cost more than it saves, or nothing at all."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # PEFT not installed: no adapters
        BaseTunerLayer = ()
    targets, skipped = [], set()
    for module in modules:
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        skipped.update(id(sub) for sub in module.modules() if sub is not module and sub is not base)
        if getattr(module.__dict__.get("forward"), "skips_lora_branch", False) and runs_as_plain_linear(base):
            skipped.add(id(base))  # the skipped branch calls F.linear on the base weight itself, not the base layer
            targets.append((module, base))
    for module in modules:
        if id(module) not in skipped and _computes_plain_linear(module):
            targets.append((module, module))
    return targets


def _packed_forward(original, packed: torch.Tensor, bias: torch.Tensor | None):
    def forward(x, *args, **kwargs):
        if args or kwargs or torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return original(x, *args, **kwargs)
        autocast_dtype = _cpu_autocast_dtype()
        if autocast_dtype not in (None, torch.bfloat16):
            return original(x)
        if x.dtype != torch.bfloat16:
            # Under bf16 autocast F.linear casts its input; outside it a mismatched input is the layer's own business.
            if autocast_dtype is None:
                return original(x)
            x = x.to(torch.bfloat16)
        return packed_linear(x, packed, bias)

    forward.packed_for_generation = True
    return forward


@contextmanager
def linears_packed_for_generation(modules: list[nn.Module], enabled: bool = True, rows: int | None = None, casts=None):
    """Inside the context, every packable linear layer among `modules` (`list(model.modules())`) computing in bf16 on
    the CPU multiplies by its weight packed on entry (see the module docstring); on exit their forwards are back. Enter
    it inside the autocast region and the adapter merge generation runs in, under `torch.no_grad()`. `rows`: the
    number of responses generated together (oneDNN picks its layout for that many rows). `casts`: the trainer's
    `FrozenWeightCasts`, whose packed copies of frozen weights last for the run. Yields whether any layer is packed; a
    no-op where `enabled` is False, gradients are on, or `packing_available()` is False."""
    from torch.nn.modules import module as module_state

    # A global forward pre-hook could recompute any weight before its layer runs.
    if not enabled or torch.is_grad_enabled() or module_state._global_forward_pre_hooks or not packing_available():
        yield False
        return
    patched = []
    try:
        for module, linear in _targets(modules):
            try:
                found = _packed_weight_and_bias(linear, rows, casts)
            except RuntimeError as exc:  # a shape or build oneDNN cannot pack: this layer keeps its own forward
                logger.debug("Not packing %s for generation: %s", type(module).__name__, exc)
                continue
            if found is None:
                continue
            packed, bias = found
            previous = module.__dict__.get("forward")
            module.forward = _packed_forward(previous or module.forward, packed, bias)
            patched.append((module, previous))
        yield bool(patched)
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


__all__ = ["linears_packed_for_generation", "pack_weight", "packed_linear", "packing_available"]
