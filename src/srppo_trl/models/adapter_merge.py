"""Rollouts of a LoRA policy at the speed of the plain model: the adapter folded into the base weights, then undone.

A LoRA layer computes `W x + s B (A x)`: two extra small matmuls per targeted layer at every decoding step, which make
LoRA rollouts markedly slower than `generate` of a plain model. For generation we add `s B A` to `W` once, run the
layers as plain linears, and afterwards copy the saved `W` back, so the weights after a rollout are bit-identical to
those before (PEFT's own `merge_adapter` / `unmerge_adapter` subtracts the delta again, which is not exact in floating
point, and it would leave the shared base of single-base mode drifting).

The saved copy of each targeted weight lives on the CPU (on a GPU this costs host memory and two copies, not GPU
memory). In fp32 the merged layer `(W + s B A) x` equals `W x + s B (A x)` up to rounding (~1e-7 relative), so the
sampled tokens are those of the unmerged policy (tested); in bf16 the merged weight is rounded to bf16 once, a
difference of the order of bf16's own rounding of the LoRA branch.

Only plain LoRA linears are merged: a layer with a quantized (k-bit) base, a LoRA variant (DoRA, ...), a LoRA bias or
anything else makes the whole model fall back to the unmerged forward. Under DeepSpeed ZeRO-3 and FSDP the trainer
does not merge (the weights are sharded).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _active_adapters(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def mergeable_lora_layers(model: nn.Module) -> list | None:
    """The LoRA linears of `model` with an active adapter, or None when one of them cannot be merged exactly this way
    (quantized base, LoRA variant, LoRA bias, adapters disabled, already merged) or the model has none."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # PEFT not installed: no adapters to merge
        return None
    layers = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not LoraLinear:  # bnb / other LoRA layer types, LoHa, ...
            return None
        active = _active_adapters(module)
        if not active:
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if (
            module.disable_adapters
            or module.merged
            or not isinstance(base, nn.Linear)
            or weight is None
            or not weight.is_floating_point()
            or weight.numel() == 0  # a ZeRO-3 partition
            or any(name in getattr(module, "lora_variant", {}) for name in active)
            or any(getattr(module, "lora_bias", {}).get(name, False) for name in active)
        ):
            return None
        layers.append(module)
    return layers or None


@contextmanager
def lora_merged_for_generation(model: nn.Module, enabled: bool = True):
    """Inside the context, `model`'s active LoRA adapters are folded into the base weights and the LoRA branches are
    skipped; on exit every base weight is restored bit for bit and the branches are back. A no-op when `enabled` is
    False or the model has no (mergeable) LoRA layer. Use it under `torch.no_grad()`, for generation only."""
    layers = mergeable_lora_layers(model) if enabled else None
    if not layers:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                saved.append((layer, weight, weight.detach().to("cpu", copy=True)))
                for name in _active_adapters(layer):
                    weight.add_(layer.get_delta_weight(name).to(weight.dtype))
                # The branch is skipped through the layer's own flag: PEFT's `disable_adapter_layers` would also
                # rewrite `requires_grad` of the adapter weights (see single_base.keep_requires_grad).
                layer._disable_adapters = True
        yield True
    finally:
        with torch.no_grad():
            for layer, weight, original in saved:
                weight.copy_(original)
                layer._disable_adapters = False
