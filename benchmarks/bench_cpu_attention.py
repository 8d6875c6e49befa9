"""bf16 attention on a CPU: PyTorch's flash kernel against `srppo_trl.trainer.cpu_attention` (the same forward, the
backward in fp32), forward + backward, at several sequence lengths, in one process.

SmolLM2-135M's attention shape (9 heads of 64) and the bench's batch of 8 by default. For each length, the two
variants alternate (`--repeats` timed rounds after one warm-up each) and their medians are compared, with PyTorch's
bf16 forward alone beside them; the gradients of both are compared with fp32 attention on the same bf16-rounded
inputs and output gradient (relative Frobenius error of dq, dk, dv). The trainer uses the fp32 backward below
`SHORT_QUERY_LENGTH` (192) queries only. One torch thread by default.

    python benchmarks/bench_cpu_attention.py
    python benchmarks/bench_cpu_attention.py --lengths 64,128,256 --batch 32

Prints a table and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="40,71,128,191,256,400", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant and length")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from srppo_trl.trainer.cpu_attention import _bool_mask_as_additive, _FlashForwardFp32Backward
    from srppo_trl.trainer.precision import bf16_cpu_flags

    torch.set_num_threads(args.threads)

    def pytorch(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fp32_backward(q, k, v, mask):
        # Called directly (not through `sdpa_with_fp32_backward`) so that lengths from 192 on are measured too.
        return _FlashForwardFp32Backward.apply(q, k, v, _bool_mask_as_additive(mask, q.dtype), False, None)

    def step(fn, qkv, mask, grad):
        for t in qkv:
            t.grad = None
        start = time.perf_counter()
        fn(*qkv, mask).backward(grad)
        return time.perf_counter() - start

    def forward_only(qkv, mask):
        start = time.perf_counter()
        with torch.no_grad():
            pytorch(*qkv, mask)
        return time.perf_counter() - start

    rows = []
    print(
        "| length | PyTorch bf16 fwd ms | PyTorch bf16 fwd+bwd ms | bf16 fwd + fp32 bwd ms | ratio "
        "| grad err PyTorch bf16 | grad err fp32 bwd |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(length)
        shape = (args.batch, args.heads, length, args.head_dim)
        base = [torch.randn(shape, generator=g).bfloat16().float() for _ in range(3)]  # bf16-representable
        grad32 = torch.randn(shape, generator=g).bfloat16().float()
        mask = torch.ones(args.batch, 1, length, length, dtype=torch.bool).tril()
        mask[: args.batch // 2, :, :, :7] = False  # left padding on half the rows
        mask[: args.batch // 2, :, :7, :7] |= torch.eye(7, dtype=torch.bool)
        exact = [t.clone().requires_grad_() for t in base]
        step(pytorch, exact, mask, grad32)
        qkv, grad = [t.bfloat16().requires_grad_() for t in base], grad32.bfloat16()
        errors, times = {}, {"pytorch": [], "fp32_backward": [], "forward": []}
        for name, fn in (("pytorch", pytorch), ("fp32_backward", fp32_backward)):
            step(fn, qkv, mask, grad)  # warm-up
            errors[name] = [
                round(((t.grad.float() - e.grad).norm() / e.grad.norm()).item(), 5) for t, e in zip(qkv, exact)
            ]
        forward_only(qkv, mask)
        for _ in range(args.repeats):
            for name, fn in (("pytorch", pytorch), ("fp32_backward", fp32_backward)):
                times[name].append(step(fn, qkv, mask, grad))
            times["forward"].append(forward_only(qkv, mask))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {
            "length": length,
            "pytorch_forward_ms": med["forward"] * 1e3,
            "pytorch_ms": med["pytorch"] * 1e3,
            "fp32_backward_ms": med["fp32_backward"] * 1e3,
            "ratio": med["fp32_backward"] / med["pytorch"],
            "grad_rel_err_pytorch": errors["pytorch"],
            "grad_rel_err_fp32_backward": errors["fp32_backward"],
        }
        rows.append(row)
        print(
            f"| {length} | {row['pytorch_forward_ms']:.2f} | {row['pytorch_ms']:.2f} | {row['fp32_backward_ms']:.2f} | {row['ratio']:.2f} | "
            f"{max(errors['pytorch']):.4f} | {max(errors['fp32_backward']):.4f} |",
            flush=True,
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "bf16_flags": bf16_cpu_flags(),
        "torch": torch.__version__,
    }
    print(json.dumps({"config": vars(args), "machine": machine, "rows": rows}))


if __name__ == "__main__":
    main()
