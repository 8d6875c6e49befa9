"""What `srppo_trl.models.contiguous_lm_head` buys: one trainer, its updates alternating between two variants, one process.

- `off`: the LM head gets the slice of the hidden states as transformers slices it;
- `lm_head`: the LM head's input is copied to a contiguous tensor first (what the trainer does).

Same configuration as `bench_update.py` (`bench_common.py`: SmolLM2-135M-Instruct, 1 PPO epoch, 1 minibatch, exactly
RESPONSE_LENGTH new tokens). Update i (after one warm-up) runs variant i mod 2, so that a drift of the machine's speed
hits both alike; each variant's median over its updates is compared with `off`'s. One torch thread.

    python benchmarks/bench_contiguous_lm_head.py                               # single_base, 2 updates per variant
    python benchmarks/bench_contiguous_lm_head.py --mode four_model --rounds 3  # four full models
    python benchmarks/bench_contiguous_lm_head.py --shape large                 # 32 prompts x 64 new tokens
    python benchmarks/bench_contiguous_lm_head.py --lm-head-only                # only the LM-head product, sliced vs copied

Prints one line per update and, last, one JSON line with the medians and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
VARIANTS = ("off", "lm_head")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("single_base", "four_model"), default="single_base")
    parser.add_argument("--rounds", type=int, default=2, help="timed updates per variant (after one warm-up)")
    parser.add_argument(
        "--shape", choices=("small", "large"), default="small", help="8x32 or 32x64 (prompts x tokens)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $SRPPO_CACHE or ~/.cache/srppo_trl)")
    parser.add_argument("--lm-head-only", action="store_true", help="time SmolLM2's LM-head product alone")
    args = parser.parse_args(argv)
    if args.lm_head_only:
        return lm_head_product(args.threads)
    os.environ["SRPPO_BENCH_SHAPE"] = args.shape  # read by bench_common at import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))

    import bench_common as bc
    import bench_update
    import torch
    from transformers import TrainerCallback

    import srppo_trl.models.contiguous_lm_head as contiguous_lm_head
    import srppo_trl.trainer.srppo_trainer
    from srppo_trl.smollm2 import default_cache_dir

    torch.set_num_threads(args.threads)
    args.cache_dir = args.cache_dir or str(default_cache_dir())
    bc.prepare_models(args.cache_dir)
    args.updates = 2 * args.rounds  # read by bench_update._build_trainer (max_steps = updates + 1)

    variant = {"name": VARIANTS[-1]}
    real_contiguous = contiguous_lm_head.contiguous_lm_head_input

    def contiguous(models):  # the LM-head copy, switched per update (a benchmark-only patch)
        return real_contiguous(models) if variant["name"] != "off" else contextlib.nullcontext()

    srppo_trl.trainer.srppo_trainer.contiguous_lm_head_input = contiguous
    times = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = bench_update._build_trainer(args.mode, args, output_dir)

        class Alternate(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                step = state.global_step  # 0 = warm-up (runs the default variant)
                variant["name"] = VARIANTS[-1] if step == 0 else VARIANTS[(step - 1) % 2]
                self.start = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                seconds = time.perf_counter() - self.start
                label = "warm-up" if state.global_step == 1 else variant["name"]
                print(f"update {state.global_step}: {label} {seconds:.2f} s", file=sys.stderr, flush=True)
                if state.global_step > 1:
                    times[variant["name"]].append(seconds)

        trainer.add_callback(Alternate())
        trainer.train()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "mode": args.mode,
        "shape": args.shape,
        "updates_s": times,
        "median_s": medians,
        "over_off": {name: medians[name] / medians["off"] for name in VARIANTS},
        "machine": {
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_avg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },  # fmt: skip
        "torch": torch.__version__,
    }
    for name in VARIANTS:
        print(f"{name:>13}: median {medians[name]:.2f} s per update, {result['over_off'][name]:.3f}x off")
    print(json.dumps(result))


def lm_head_product(threads: int) -> None:
    """SmolLM2-135M's LM head (576 -> 49152, random fp32 weights) on the response positions of both benchmark shapes,
    as transformers slices them (`hidden[:, -keep:]`) and copied first; forward, and forward + backward to the hidden
    states. Medians of 5 after 2 warm-ups."""
    import torch

    torch.set_num_threads(threads)
    weight = torch.randn(49152, 576) / 24

    def median_s(fn, reps=5):
        for _ in range(2):
            fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    result = {}
    for rows, length, keep in ((8, 71, 33), (32, 103, 65)):  # prompts, prompt + response tokens, positions scored
        hidden = torch.randn(rows, length, 576, requires_grad=True)

        def forward(copy, backward, hidden=hidden, keep=keep):
            with torch.set_grad_enabled(backward):
                picked = hidden[:, -keep:]
                logits = torch.nn.functional.linear(picked.contiguous() if copy else picked, weight)
                if backward:
                    logits.sum().backward()

        with torch.no_grad():
            picked = hidden[:, -keep:]
            same = torch.equal(
                torch.nn.functional.linear(picked, weight), torch.nn.functional.linear(picked.contiguous(), weight)
            )
        result[f"{rows}x{keep} bitwise_equal"] = same
        print(f"{rows}x{keep}: logits bitwise equal: {same}")
        for backward in (False, True):
            sliced, copied = (median_s(lambda c=c, b=backward: forward(c, b)) for c in (False, True))
            key = f"{rows}x{keep}{' fwd+bwd' if backward else ' fwd'}"
            result[key] = {"sliced_s": sliced, "copied_s": copied, "copied_over_sliced": copied / sliced}
            print(f"{key:>14}: sliced {sliced:.3f} s, copied {copied:.3f} s ({copied / sliced:.2f}x)")
    print(json.dumps({"lm_head": result, "threads": threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
