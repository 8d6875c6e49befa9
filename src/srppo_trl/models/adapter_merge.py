"""Rollouts of a LoRA policy at the speed of the plain model: the adapter folded into the base weights, then undone.

A LoRA layer computes `W x + s B (A x)`: two extra small matmuls per targeted layer at every decoding step, which make
LoRA rollouts markedly slower than `generate` of a plain model. For generation we add `s B A` to `W` once, run the
layers as plain linears, and afterwards put the exact `W` back, so the weights after a rollout are bit-identical to
those before (PEFT's own `merge_adapter` / `unmerge_adapter` subtracts the delta again, which is not exact in floating
point, and it would leave the shared base of single-base mode drifting).

On a CPU the merged weight `W + s B A` is a tensor of its own, swapped in for the region (`weight.data`) and swapped
out after: one pass over `W`, nothing written to it. On a GPU `W` is merged in place and restored from a copy saved in
host memory, so that the merge costs no GPU memory. In fp32 the merged layer `(W + s B A) x` equals
`W x + s B (A x)` up to rounding (~1e-7 relative), so the sampled tokens are those of the unmerged policy (tested);
in bf16 the merged weight is rounded to bf16 once, a difference of the order of bf16's own rounding of the LoRA
branch.

Under autocast over fp32 weights (`bf16=True` with fp32 weights, the CPU default) the caller passes the autocast dtype:
each merged weight is then built once, as a bf16 tensor `(W + s B A).to(bf16)` (through one fp32 scratch shared by
all layers, into a buffer kept from one rollout to the next when the caller provides one), swapped in for the region
(`weight.data`), and the original tensor is swapped back on exit. Nothing is written to `W`, no fp32 copy is saved,
and autocast has no weight left to cast at each step: the same bf16 weights autocast would have used after an
in-place merge (bit for bit), for one pass over the weights instead of four, and half the extra memory (the bf16
copies autocast would have held anyway; on a GPU, where the in-place path saves its copy in host memory, the device
holds the same bf16 copies either way). fp16 autocast takes the same path. Consequence: inside the region a targeted
linear must run under that autocast (model code that turns autocast off around a LoRA-targeted linear would meet a
bf16 weight and fp32 inputs; none of transformers' decoder layers does).

Only plain LoRA linears are merged: a layer with a quantized (k-bit) base, a LoRA variant (DoRA, ...), a LoRA bias, a
base weight shared with another module (a LoRA on a tied `lm_head` would change the embeddings too) or anything else
makes the whole model fall back to the unmerged forward. Under DeepSpeed ZeRO-3 and FSDP the trainer
does not merge (the weights are sharded).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _active_adapters(layer) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def lora_layers(model: nn.Module) -> tuple[list, bool] | None:
    """One walk of `model`: its LoRA layers (every PEFT tuner layer) and whether one of their base weights is shared
    with another module (a tied embedding); None without PEFT. What `mergeable_lora_layers` checks the state of: a
    caller that generates many times with the same model (the trainer) keeps this and passes it back as `found`."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # PEFT not installed: no adapters to merge
        return None
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    weights = [getattr(layer.get_base_layer(), "weight", None) for layer in layers]
    return layers, _is_shared(model, [w for w in weights if isinstance(w, torch.Tensor)])


def mergeable_lora_layers(model: nn.Module, found: tuple[list, bool] | None = None) -> list | None:
    """The LoRA linears of `model` with an active adapter, or None when one of them cannot be merged exactly this way
    (quantized base, LoRA variant, LoRA bias, adapters disabled, already merged, a base packed for generation, a base
    weight tied to another module) or the model has none. `found`: `lora_layers(model)` from an earlier call, to skip
    the walk over the model (a layer added to the model since is then not merged and runs its own LoRA forward)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # PEFT not installed: no adapters to merge
        return None
    found = lora_layers(model) if found is None else found
    if found is None:
        return None
    candidates, shared = found
    layers = []
    for module in candidates:
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
            # Its base already multiplies by a packed copy of the unmerged weight (trainer.packed_linear entered
            # first): merging would leave the adapter out. The unmerged forward adds it.
            or getattr(base.__dict__.get("forward"), "packed_for_generation", False)
            or any(name in getattr(module, "lora_variant", {}) for name in active)
            or any(getattr(module, "lora_bias", {}).get(name, False) for name in active)
        ):
            return None
        layers.append(module)
    if layers and shared:
        return None
    return layers or None


def _is_shared(model: nn.Module, weights: list) -> bool:
    """True when one of `weights` is registered in more than one place in `model`, or shares its storage with another
    parameter (a tied embedding)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[param.data_ptr()] = counts.get(param.data_ptr(), 0) + 1
    return any(counts.get(weight.data_ptr(), 0) > 1 for weight in weights)


def _plus_delta(weight: torch.Tensor, layer, name: str, in_place: bool) -> torch.Tensor:
    """`weight + s B A` for the adapter `name`, written into `weight` when `in_place`. One fused `addmm` (a single pass
    over the weight, instead of PEFT's `get_delta_weight` writing `B A`, scaling it and adding it) where the LoRA
    weights are fp32 like `weight` and not transposed (`fan_in_fan_out`); else PEFT's `get_delta_weight` (which
    computes a bf16/fp16 delta on a CPU in fp32)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not layer.fan_in_fan_out and a.dtype == b.dtype == weight.dtype == torch.float32:
        scaling = layer.scaling[name]
        return weight.addmm_(b, a, alpha=scaling) if in_place else torch.addmm(weight, b, a, alpha=scaling)
    delta = layer.get_delta_weight(name).to(weight.dtype)
    return weight.add_(delta) if in_place else weight + delta


def _merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """`W + s B A` over the layer's active adapters, in `W`'s dtype and outside any autocast (a bf16 delta would round
    the adapter more than the final cast does)."""
    with torch.autocast(weight.device.type, enabled=False):
        merged = weight.detach()
        for name in _active_adapters(layer):
            merged = _plus_delta(merged, layer, name, in_place=False)
    return merged


def _fused_merge_possible(layer, weight: torch.Tensor) -> bool:
    """True when every active adapter of `layer` merges with one fp32 `addmm` (see `_plus_delta`)."""
    if layer.fan_in_fan_out or weight.dtype != torch.float32:
        return False
    return all(
        layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype == torch.float32
        for name in _active_adapters(layer)
    )


def _merged_in_dtype(
    layer,
    weight: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(W + s B A).to(dtype)`, bit for bit, written into `out` (a tensor of `W`'s shape in `dtype`) or a new tensor.
    The fp32 sum goes into `scratch` (a flat fp32 tensor of at least `W.numel()` elements) when given, so that a merge
    of many layers touches one fp32 buffer instead of allocating one per layer. The very `addmm` of `_plus_delta` on
    the whole weight: a block of rows at a time would stay in cache, but BLAS picks its kernel by the matrix shape, and
    the sums of a block then round differently from those of the whole product."""
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if not _fused_merge_possible(layer, weight) or scratch is None:
        with torch.no_grad():
            return out.copy_(_merged_weight(layer, weight))
    merged = scratch[: weight.numel()].view(weight.shape)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        for i, name in enumerate(_active_adapters(layer)):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            torch.addmm(weight.detach() if i == 0 else merged, b, a, alpha=layer.scaling[name], out=merged)
        return out.copy_(merged)


def _peft_only_kwargs() -> tuple[str, ...]:
    try:
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    except ImportError:  # another PEFT version: the keys of 0.21
        VARIANT_KWARG_KEYS = ["alora_offsets"]
    return ("adapter_names", *VARIANT_KWARG_KEYS)


_PEFT_ONLY_KWARGS = _peft_only_kwargs()


def runs_as_plain_linear(base: nn.Module) -> bool:
    """True when calling `base` computes `F.linear(x, base.weight, base.bias)` and nothing else: a plain `nn.Linear`
    without hooks of its own or global ones, whose forward is the class's or the trainer's cast of frozen weights
    (`FrozenWeightCasts`, which with the merged weight swapped in calls the class's forward, and under an in-place
    merge casts the weight as autocast would)."""
    from torch.nn.modules import module as module_state

    own_forward = base.__dict__.get("forward")
    return (
        type(base) is nn.Linear
        and (own_forward is None or getattr(own_forward, "casts_frozen_weight", False))
        and not (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks)
        and not (
            module_state._global_forward_hooks
            or module_state._global_forward_pre_hooks
            or module_state._global_backward_hooks
            or module_state._global_backward_pre_hooks
        )
    )


def _skip_branch(layer) -> None:
    """Run `layer` as its base linear: the adapter is off through the layer's own flag (PEFT's `disable_adapter_layers`
    would also rewrite `requires_grad` of the adapter weights, see single_base.keep_requires_grad), and its forward is
    the base layer's. We deliberately bypass PEFT's `forward` here: with the adapter off it only checks its arguments
    and calls the base layer, and that bookkeeping runs at every targeted layer and decoding step. Where the base is a
    plain linear (`runs_as_plain_linear`), it is not even called as a module: its `F.linear` runs directly (each
    module call costs microseconds of Python, over 200 of them per decoding step here). Hooks registered on the LoRA
    layer still run (its `__call__` is unchanged)."""
    layer._disable_adapters = True
    if "forward" in layer.__dict__:  # a forward of its own set on the instance: left as it is
        return
    base = layer.get_base_layer()
    plain = runs_as_plain_linear(base)

    def forward(x, *args, **kwargs):
        for key in _PEFT_ONLY_KWARGS:  # what PEFT's forward takes for itself and never passes to the base layer
            kwargs.pop(key, None)
        if plain and not args and not kwargs:
            return F.linear(x, base.weight, base.bias)
        return base(x, *args, **kwargs)

    forward.skips_lora_branch = True
    layer.forward = forward


def _restore_branch(layer) -> None:
    if getattr(layer.__dict__.get("forward"), "skips_lora_branch", False):
        del layer.forward
    layer._disable_adapters = False


@contextmanager
def lora_merged_for_generation(
    model: nn.Module, enabled: bool = True, dtype: torch.dtype | None = None, buffers=None, found=None
):
    """Inside the context, `model`'s active LoRA adapters are folded into the base weights and the LoRA branches are
    skipped; on exit every base weight is restored bit for bit and the branches are back. A no-op when `enabled` is
    False or the model has no (mergeable) LoRA layer. Use it under `torch.no_grad()`, for generation only.

    `dtype`: the autocast dtype the model will run in, if any. Where it is narrower than the base weights (bf16
    autocast over fp32 weights), the merged weights are swapped in already cast to it (see the module docstring);
    otherwise, on a CPU, they are swapped in in the weights' dtype, and elsewhere merged in place and restored from a
    copy saved in host memory.

    `buffers`: where to write the swapped-in merged weights, an object whose `buffer(weight, dtype)` returns the same
    tensor of `weight`'s shape for every rollout (the trainer's `FrozenWeightCasts`); without it they are allocated
    afresh each time (on a CPU, first touching that much new memory costs page faults at every rollout).

    `found`: `lora_layers(model)` kept from an earlier call (see `mergeable_lora_layers`)."""
    layers = mergeable_lora_layers(model, found) if enabled else None
    if not layers:
        yield False
        return
    weights = [layer.get_base_layer().weight for layer in layers]
    narrower = dtype is not None and all(w.dtype.itemsize > dtype.itemsize for w in weights)
    if narrower:  # cast to `dtype` through one fp32 scratch shared by all layers
        scratch = torch.empty(max(w.numel() for w in weights), dtype=torch.float32, device=weights[0].device)

        def merged_weight(layer, weight):
            out = buffers.buffer(weight, dtype) if buffers is not None else None
            return _merged_in_dtype(layer, weight, dtype, out=out, scratch=scratch)

        with _swapped_in(layers, weights, merged_weight):
            yield True
        return
    if all(w.device.type == "cpu" for w in weights):
        # On a CPU the in-place path's saved copies would be CPU memory of the same size: swapped in, the merged weights
        # cost one pass over the weights, where the in-place path copies each out, merges it and copies it back.
        with _swapped_in(layers, weights, lambda layer, weight: _merged_in_own_dtype(layer, weight, buffers)):
            yield True
        return
    saved = []
    try:
        with torch.no_grad(), torch.autocast(weights[0].device.type, enabled=False):
            for layer, weight in zip(layers, weights):
                saved.append((layer, weight, weight.detach().to("cpu", copy=True)))
                for name in _active_adapters(layer):
                    _plus_delta(weight, layer, name, in_place=True)
                _skip_branch(layer)
        yield True
    finally:
        with torch.no_grad():
            for layer, weight, original in saved:
                weight.copy_(original)
                _restore_branch(layer)


def _merged_in_own_dtype(layer, weight: torch.Tensor, buffers=None) -> torch.Tensor:
    """`W + s B A` in `W`'s dtype as a tensor of its own: the very `addmm` of the in-place merge, written into
    `buffers.buffer(weight, dtype)` when given and the merge is one fused `addmm`, else `_merged_weight`'s."""
    if buffers is not None and _fused_merge_possible(layer, weight) and len(_active_adapters(layer)) == 1:
        (name,) = _active_adapters(layer)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        with torch.autocast(weight.device.type, enabled=False):
            out = buffers.buffer(weight, weight.dtype)
            return torch.addmm(weight.detach(), b, a, alpha=layer.scaling[name], out=out)
    return _merged_weight(layer, weight)


@contextmanager
def _swapped_in(layers: list, weights: list, merged_weight):
    """Each layer's weight data replaced by `merged_weight(layer, weight)` and its LoRA branch skipped; the original
    tensors and the branches put back on exit (the parameters themselves, their names and `requires_grad` are
    untouched)."""
    originals = []
    try:
        with torch.no_grad():
            for layer, weight in zip(layers, weights):
                merged = merged_weight(layer, weight)
                originals.append((layer, weight, weight.data))
                weight.data = merged
                _skip_branch(layer)
        yield
    finally:
        for layer, weight, original in originals:
            weight.data = original
            _restore_branch(layer)
