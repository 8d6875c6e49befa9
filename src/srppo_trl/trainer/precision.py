"""Which precision a CPU run may use.

bf16 matmuls are fast on a CPU only with hardware support: x86's AVX-512 BF16 or AMX (`avx512_bf16`, `amx_bf16` in
`/proc/cpuinfo`), or Arm's BF16 extension (`bf16` among the `Features`). Without it PyTorch converts and computes
bf16 in software, which is several times slower than fp32 (docs/performance.md has the measurements), so
`SRPPOConfig(bf16=True)` is refused on such a CPU rather than silently running slower and less exactly.
"""

from __future__ import annotations

import os
import platform
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
def frozen_weights_cast_once(model, enabled: bool = True):
    """Inside an autocast region, let the frozen fp32 weights of `model` be cast to the low precision once, not at every
    forward (every decoding step of `generate`).

    PyTorch's autocast keeps the low-precision copy of a weight for the rest of the region only for leaf tensors that
    require grad; a frozen base (single-base mode, with the policy adapter merged into it for generation) would be cast
    again at every step, which made single-base generation in bf16 twice as slow as plain `generate`. The frozen fp32
    weights are marked as requiring grad while inside (generation runs under `no_grad`, so no graph is built) and
    unmarked after: the same casts, done once, at the cost of holding their bf16 copies while the region lasts.
    """
    import torch

    params = list(model.parameters()) if enabled else []
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
