"""The offline benchmark's greedy generation: `model.generate` against `greedy_decode`, and whether the budget suffices.

1. Speed: the same held-out prompts (the offline benchmark's held-out split) answered greedily by the rollouts'
   sampler (`model.generate`, `--generate-batch` prompts per call; a batch runs until its last row ends) and by
   `srppo_trl.evaluation.generation.greedy_decode` (rows leave the batch as they end) at each `--batch-sizes`, all in
   this one process, on the first model. Prints seconds, the ratio to `generate` and how many answers are identical.
2. Budget: every model answers with `--long-budget` new tokens; prints the share of answers still without EOS after
   128, 256, ... tokens. When that share stops falling at the benchmark's budget, the answers it truncates are
   answers that never end (loops), not answers cut short.

    python benchmarks/bench_greedy_eval.py                                  # SmolLM2-135M-Instruct
    python benchmarks/bench_greedy_eval.py --models outputs/replication/seed0/srppo outputs/replication/seed0/sft/sft

Prints one line per measurement and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["smollm2"], help="'smollm2' or local model folders")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (the offline benchmark's split)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the budget of the speed comparison")
    parser.add_argument("--generate-batch", type=int, default=16, help="prompts per `generate` call")
    parser.add_argument("--batch-sizes", default="16,64", help="greedy_decode batch sizes, comma-separated")
    parser.add_argument("--long-budget", type=int, default=768, help="budget of the truncation check (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE.parent / "src"))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_trl.data.tokenization import tokenize_prompt
    from srppo_trl.evaluation.generation import (
        evaluation_generation_config,
        generate_in_batches,
        greedy_decode,
        left_padded,
    )
    from srppo_trl.evaluation.instructions import build_instruction_prompts

    torch.set_num_threads(args.threads)
    examples = build_instruction_prompts(150, seed=1, split="held_out")[: args.prompts]

    def load(name):
        path = name
        if name == "smollm2":
            from srppo_trl.smollm2 import prepare_smollm2

            path = str(prepare_smollm2())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = [tokenize_prompt(tokenizer, [{"role": "user", "content": e["prompt"]}]) for e in examples]
        return model, tokenizer, ids

    def decode_all(model, ids, eos, pad, batch_size, budget):
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        rows = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = left_padded([ids[i] for i in idx], pad)
            for i, row in zip(idx, greedy_decode(model, input_ids, mask, budget, eos)):
                rows[i] = row
        return rows

    result = {"machine": {"cpu": cpu_flags(), "threads": args.threads}, "prompts": len(examples)}
    print(f"machine: {cpu_flags()}, {args.threads} threads; {len(examples)} held-out prompts", flush=True)

    model, tokenizer, ids = load(args.models[0])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = evaluation_generation_config(args.max_new_tokens, pad, eos)
    start = time.perf_counter()
    reference = generate_in_batches(model, ids, config, args.generate_batch, longest_first=True, show_progress=False)
    base_s = time.perf_counter() - start
    speed = {"model": args.models[0], "max_new_tokens": args.max_new_tokens, "generate_s": round(base_s, 1)}
    print(f"generate, batch {args.generate_batch}: {base_s:.1f} s", flush=True)
    for size in (int(s) for s in args.batch_sizes.split(",")):
        start = time.perf_counter()
        rows = decode_all(model, ids, eos, pad, size, args.max_new_tokens)
        seconds = time.perf_counter() - start
        same = sum(a == b for a, b in zip(rows, reference))
        speed[f"greedy_decode_{size}"] = {"s": round(seconds, 1), "ratio": round(seconds / base_s, 3), "same": same}
        print(f"greedy_decode, batch {size}: {seconds:.1f} s, {seconds / base_s:.2f}x, {same}/{len(ids)} identical")
    result["speed"] = speed

    result["budget"] = {}
    for name in args.models if args.long_budget else []:
        if name != args.models[0]:
            model, tokenizer, ids = load(name)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = decode_all(model, ids, eos, pad, max(int(s) for s in args.batch_sizes.split(",")), args.long_budget)
        standard = (128, 256, 384, 512, 768, 1024)
        cuts = sorted({c for c in standard if c < args.long_budget} | {args.max_new_tokens, args.long_budget})
        rates = {c: round(sum(eos not in row[:c] for row in rows) / len(rows), 3) for c in cuts}
        result["budget"][name] = rates
        print(f"{name}: without EOS after " + ", ".join(f"{c} tokens {r:.3f}" for c, r in rates.items()), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
