"""Which precision a CPU run may use, and casting frozen weights to it once rather than at every forward.

bf16 matmuls are fast on a CPU only with hardware support: x86's AVX-512 BF16 or AMX (`avx512_bf16`, `amx_bf16` in
`/proc/cpuinfo`), or Arm's BF16 extension (`bf16` among the `Features`). Without it PyTorch converts and computes
bf16 in software, which is several times slower than fp32 (docs/performance.md has the measurements), so
`SRPPOConfig(bf16=True)` is refused on such a CPU rather than silently running slower and less exactly.

Under bf16 autocast over fp32 weights (`bf16=True` on a CPU), autocast casts each weight at every forward unless the
weight requires grad: `frozen_weights_cast_once` (generation) and `FrozenWeightCasts` (the whole run) cast frozen
weights once instead, with bit-identical results.
"""

from __future__ import annotations

import os
import platform
import weakref
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)


def _cpuinfo_flags(text: str) -> set[str]:
    """The feature words of `/proc/cpuinfo` (x86 `flags`, Arm `Features`), from every processor."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def bf16_cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 instruction-set flags this CPU reports (empty where it has none or the platform hides them)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = _cpuinfo_flags(cpuinfo)
    wanted = ARM_BF16_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else X86_BF16_FLAGS
    return [flag for flag in wanted if flag in flags]


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX-512 BF16, AMX or Arm BF16)."""
    return bool(bf16_cpu_flags())


ALLOW_SLOW_CPU_BF16 = "SRPPO_ALLOW_SLOW_CPU_BF16"  # "1": run bf16 on such a CPU anyway (tests, experiments)


def check_cpu_bf16(bf16: bool, on_cpu: bool) -> None:
    """Refuse `bf16=True` for a CPU run on a CPU without bf16 instructions, in one sentence (unless the environment
    variable `SRPPO_ALLOW_SLOW_CPU_BF16=1` asks for it anyway)."""
    if bf16 and on_cpu and not cpu_has_fast_bf16() and os.environ.get(ALLOW_SLOW_CPU_BF16) != "1":
        wanted = " or ".join(ARM_BF16_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else X86_BF16_FLAGS)
        raise ValueError(
            f"bf16=True on a CPU without bf16 instructions (no {wanted} in /proc/cpuinfo) runs several times slower "
            "than fp32 and less exactly: set bf16=False (`--bf16 false`), or run on a GPU or a CPU with AVX-512 BF16/AMX."
        )


def training_on_cpu(use_cpu: bool) -> bool:
    """True when the Trainer would place the models on the CPU (no CUDA/XPU/MPS device, or `use_cpu=True`)."""
    import torch

    if use_cpu:
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return not (
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


@contextmanager
def frozen_weights_cast_once(model, enabled: bool = True, params=None):
    """Inside an autocast region, let the frozen fp32 weights of `model` be cast to the low precision once, not at every
    forward (every decoding step of `generate`).

    PyTorch's autocast keeps the low-precision copy of a weight for the rest of the region only for leaf tensors that
    require grad; a frozen base (single-base mode, with the policy adapter merged into it for generation) would be cast
    again at every step, which made single-base generation in bf16 twice as slow as plain `generate`. The frozen fp32
    weights are marked as requiring grad while inside (generation runs under `no_grad`, so no graph is built) and
    unmarked after: the same casts, done once, at the cost of holding their bf16 copies while the region lasts.
    `params`: `list(model.parameters())` kept by the caller, to skip the walk over the model.
    """
    import torch

    params = (list(model.parameters()) if params is None else params) if enabled else []
    device = params[0].device.type if params else "cpu"
    if not params or not torch.is_autocast_enabled(device):
        yield
        return
    frozen = [p for p in params if not p.requires_grad and p.is_leaf and p.dtype == torch.float32]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


class FrozenWeightCasts:
    """Low-precision copies of frozen fp32 `nn.Linear` weights, made once and reused by every forward under autocast.

    Autocast keeps the low-precision copy of a weight for the rest of its region only for leaf tensors that require
    grad. A frozen weight (the SFT and PT models, the shared base of single-base mode, a separate reference model) is
    cast again at every forward of every pass. On a CPU a cast is bound by memory bandwidth, and a single-base update
    casts its frozen base in each of the SFT, PT, policy and critic passes. Frozen weights do not change during
    training, so here one copy per weight serves the whole run.

    While `installed`, each plain `nn.Linear` of the given models whose weight is frozen (no grad) and fp32 runs
    `F.linear(x, copy, bias)` under autocast: the copy is `weight.to(dtype)`, the very tensor autocast would have made,
    so outputs and gradients are bit for bit those without it (tested). Outside autocast, or while a low-precision
    merged weight is swapped in for generation (`lora_merged_for_generation`), the layer runs its own forward. A copy
    is made again when its weight changes in place (its version counter) or points to other data. Writes through
    `.data` (`weight.data += delta`, as PEFT's `merge_adapter` does) bump no version counter: whoever makes them must
    `clear` the cache (the trainer does after pushing weights to vLLM and after loading a checkpoint). Cost: the
    copies (at most half the frozen fp32 weights' size: linear weights only) stay in memory until `clear`; the trainer
    keeps them for CPU runs only (`SRPPOConfig.cache_frozen_weight_casts`) and clears them when training ends.

    The cache also keeps the buffers a LoRA policy's merged low-precision weights are written into for each rollout
    (`buffer`; half the LoRA-targeted fp32 weights' size, memory the merge needed during generation anyway), and the
    packed copies of frozen weights that bf16 generation on a CPU multiplies by (`packed`: the policy's frozen linears
    outside its adapters, e.g. single-base mode's LM head; as large again as their bf16 copies).
    """

    def __init__(self):
        self._copies: dict[int, tuple] = {}
        self._buffers: dict[int, tuple] = {}
        self._packed: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def cast(self, weight, dtype):
        """`weight.to(dtype)`, made once for as long as `weight` is unchanged."""
        import torch

        entry = self._copies.get(id(weight))
        if entry is not None:
            ref, version, data_ptr, copy = entry
            if (
                ref() is weight
                and version == weight._version
                and data_ptr == weight.data_ptr()
                and copy.dtype == dtype
            ):
                return copy
        with torch.no_grad():
            copy = weight.detach().to(dtype)
        self._copies[id(weight)] = (weakref.ref(weight), weight._version, weight.data_ptr(), copy)
        return copy

    def packed(self, weight, dtype, rows=None):
        """`cast(weight, dtype)` packed for oneDNN's bf16 products (`packed_linear.pack_weight`), made once for as long
        as that copy is the current one and `rows` is the same: generation multiplies by it at every decoding step
        (`packed_linear.linears_packed_for_generation`)."""
        from .packed_linear import pack_weight

        copy = self.cast(weight, dtype)
        entry = self._packed.get(id(weight))
        if entry is not None and entry[0] is copy and entry[1] == rows:
            return entry[2]
        packed = pack_weight(copy, rows)
        self._packed[id(weight)] = (copy, rows, packed)
        return packed

    def buffer(self, weight, dtype):
        """An uninitialised tensor of `weight`'s shape in `dtype`, the same one for as long as the cache lives: the
        trainer writes a LoRA layer's merged low-precision weight for generation into it at each rollout
        (`lora_merged_for_generation`), rather than allocating and first touching that memory afresh at each rollout
        (page faults on a CPU)."""
        import torch

        entry = self._buffers.get(id(weight))
        if entry is not None:
            ref, buffer = entry
            if (
                ref() is weight
                and buffer.shape == weight.shape
                and buffer.dtype == dtype
                and buffer.device == weight.device
            ):
                return buffer
        buffer = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        self._buffers[id(weight)] = (weakref.ref(weight), buffer)
        return buffer

    def clear(self) -> None:
        self._copies.clear()
        self._buffers.clear()
        self._packed.clear()

    @contextmanager
    def installed(self, models):
        """Inside the context, the plain `nn.Linear` layers of `models` whose weight is frozen (does not require grad)
        and fp32 on entering take its low-precision copy from this cache under autocast (None entries skipped; a
        layer shared by several models is patched once). Left alone: trainable layers (autocast casts them once per
        region already; any copy of theirs is dropped, since an optimizer step may not bump the version counter),
        layers with a forward of their own already set on the instance (e.g. a value head kept in fp32), and layers
        run by accelerate's big-model hooks (offloaded, device-mapped). Copies and buffers of weights not patched now are
        dropped."""
        import torch
        from torch import nn

        patched, weights = {}, set()
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                if type(module) is not nn.Linear or id(module) in patched:
                    continue
                weight = module.weight
                if (
                    not weight.requires_grad
                    and weight.dtype == torch.float32
                    and "forward" not in module.__dict__
                    and not hasattr(module, "_hf_hook")
                ):
                    patched[id(module)] = module
                    weights.add(id(weight))
                    module.forward = self._forward(module, module.forward)
        for key in [key for key in self._copies if key not in weights]:
            del self._copies[key]
        for key in [key for key in self._packed if key not in weights]:
            del self._packed[key]
        for key in [key for key in self._buffers if key not in weights]:  # LoRA base weights are frozen linears
            del self._buffers[key]
        try:
            yield self
        finally:
            for module in patched.values():
                del module.forward

    def _forward(self, module, original):
        import torch
        import torch.nn.functional as F

        def forward(input):
            weight = module.weight
            device = weight.device.type
            # An fp32 weight (not a merged low-precision one swapped in for generation) under autocast.
            if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                if dtype != torch.float32:
                    return F.linear(input, self.cast(weight, dtype), module.bias)
            return original(input)

        forward.casts_frozen_weight = True  # adapter_merge: calling the layer is `F.linear` under autocast
        return forward


def _lora_dropout_active(layer) -> bool:
    from torch import nn

    return any(isinstance(d, nn.Dropout) and d.training and d.p > 0 for d in layer.lora_dropout.values())


@contextmanager
def lora_input_casts_skipped(models):
    """Inside the context, PEFT's LoRA linears of `models` skip the cast of their input to the adapter's dtype where
    autocast would cast it straight back: the same values, without two copies of the activations per layer and pass.

    PEFT casts a LoRA layer's input to its adapter weights' dtype (`_cast_input_dtype`): under bf16 autocast over fp32
    adapters, a bf16 input is copied to fp32, and autocast copies it back to bf16 for `lora_A`'s matmul. A bf16 value
    survives that round trip exactly, forward and backward, so skipping it changes no bit (tested). PEFT's own
    `peft.helpers.disable_input_dtype_casting` turns the cast off unconditionally, which breaks a bf16 base with fp32
    adapters outside autocast; this decides per call. Skipped only when
    autocast is on for the input's device with the input's dtype, the adapter dtype is wider, no LoRA dropout is
    active (dropout would act on the fp32 copy) and the layer has no LoRA variant (DoRA); otherwise PEFT's cast runs.
    Only bf16/fp16 inputs to fp32 adapters (autocast leaves fp64 alone). Layers with their own `_cast_input_dtype`
    already set on the instance are left alone."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # PEFT not installed: no LoRA layers
        yield
        return
    patched = {}
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if type(module) is LoraLinear and id(module) not in patched and "_cast_input_dtype" not in module.__dict__:
                patched[id(module)] = module
                module._cast_input_dtype = _autocast_aware_input_cast(module, module._cast_input_dtype)
    try:
        yield
    finally:
        for module in patched.values():
            del module._cast_input_dtype


def _autocast_aware_input_cast(layer, original):
    import torch

    def cast(x, dtype):
        if x is not None and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16):
            device = x.device.type
            if (
                torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == x.dtype
                and not layer.lora_variant
                and not _lora_dropout_active(layer)
            ):
                return x
        return original(x, dtype)

    return cast
