"""What `srppo_trl.trainer.packed_linear` buys: the linear layers of one decoding step, bf16 on a CPU, with PyTorch's
`F.linear` against oneDNN's product on weights packed once (`pack_weight` + `packed_linear`), in one process.

Random bf16 weights in the shapes of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down projections, hidden size
576, MLP 1536, 3 key-value heads of 64; the 49152-token LM head). For each number of rows (responses decoded together;
one prompt's prefill has rows = prompts x prompt tokens) the two variants alternate, `--repeats` times each, and the
medians are compared. Also prints whether the outputs are bit for bit equal, and what packing costs per weight.

    python benchmarks/bench_packed_linear.py                    # rows 1, 8, 32 and 312, one torch thread
    python benchmarks/bench_packed_linear.py --rows 8 --repeats 9

Needs a CPU with oneDNN's bf16 support (AVX-512 BF16 or AMX for speed). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152  # SmolLM2-135M
LAYER_SHAPES = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (MLP, HIDDEN),
    (MLP, HIDDEN),
    (HIDDEN, MLP),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32,312", help="comma-separated numbers of input rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per variant and row count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from srppo_trl.trainer.packed_linear import pack_weight, packed_linear, packing_available

    if not packing_available():
        sys.exit("This CPU or PyTorch build has no oneDNN bf16 support: nothing to compare.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(out, inp, dtype=torch.bfloat16) * 0.02 for out, inp in shapes]
    n_weights = sum(w.numel() for w in weights)

    results = {}
    for rows in (int(r) for r in args.rows.split(",") if r):
        start = time.perf_counter()
        packed = [pack_weight(w, rows) for w in weights]
        pack_s = time.perf_counter() - start
        inputs = {inp: torch.randn(rows, inp, dtype=torch.bfloat16) for _, inp in shapes}

        def plain(inputs=inputs):
            return [F.linear(inputs[w.shape[1]], w) for w in weights]

        def packed_pass(inputs=inputs, packed=packed):
            return [packed_linear(inputs[w.shape[1]], p, None) for w, p in zip(weights, packed)]

        equal = all(torch.equal(a, b) for a, b in zip(plain(), packed_pass()))
        times = {"f_linear": [], "packed": []}
        for _ in range(args.repeats):  # alternating, so that a drift of the machine's speed hits both alike
            for name, fn in (("f_linear", plain), ("packed", packed_pass)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[rows] = {
            "f_linear_s": med["f_linear"],
            "packed_s": med["packed"],
            "packed_over_f_linear": med["packed"] / med["f_linear"],
            "bit_equal": equal,
            "pack_ns_per_weight": pack_s / n_weights * 1e9,
        }

    print(f"{n_weights / 1e6:.1f}M bf16 weights in {len(shapes)} linears, {args.threads} thread(s)")
    print("| rows | F.linear s | packed s | packed / F.linear | bit for bit | packing ns/weight |")
    print("|---:|---:|---:|---:|---|---:|")
    for rows, r in results.items():
        print(
            f"| {rows} | {r['f_linear_s']:.4f} | {r['packed_s']:.4f} | {r['packed_over_f_linear']:.2f} | "
            f"{'yes' if r['bit_equal'] else 'no'} | {r['pack_ns_per_weight']:.2f} |"
        )
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads}
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
        machine["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except OSError:
        pass
    print(json.dumps({"results": results, "machine": machine}))


if __name__ == "__main__":
    main()
