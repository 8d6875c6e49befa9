"""bf16 against fp32 on this CPU: seconds and log-prob error of the passes an SRPPO update runs.

On the benchmark's fixed batch (`bench_common.py`: SmolLM2-135M-Instruct, 8 prompts x 32 sampled tokens, or
`--shape large`), in one process, one after the other, each pass timed `--reps` times after one warm-up:

- **scoring**: a no-grad forward + `sequence_logprobs` (fp32 log-softmax, as the trainer's reward/KL passes), with
  (a) fp32 weights, (b) fp32 weights under `torch.autocast("cpu", bfloat16)` (what `bf16=True` gives the trained
  models: the Trainer's autocast), (c) bf16 weights (a frozen SFT/PT model loaded with `dtype=torch.bfloat16`);
- **train step**: forward + backward of `-(logprobs * advantages).sum()` on the policy, fp32 and autocast bf16;
- **generation**: `generate` of the same length, fp32 weights and bf16 weights.

Errors are against the fp32 pass on the same tokens: the largest and mean absolute per-token log-prob error, and the
largest error of a response's summed log-prob (the coherent reward is a difference of two such sums).

    python benchmarks/bench_bf16_cpu.py                     # 8 x 32, 3 reps, 1 thread
    python benchmarks/bench_bf16_cpu.py --shape large --threads 2

Prints a table and, last, one JSON line. The verdict depends on the CPU: bf16 matmuls are fast only with AVX-512
BF16 or AMX; `torch.backends.cpu.get_cpu_capability()` is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _time(fn, reps: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return [f for f in wanted if f in flags]


def _coherent_reward_errors(paths, sft32, sft16, sequences, attention, response_mask, autocast) -> dict:
    """The coherent reward of each response from the frozen SFT and PT passes, in fp32, under bf16 autocast (fp32
    weights) and with bf16 weights: per-response and batch-mean errors against fp32 (what whitening and the
    advantages see), and the fp32 rewards' spread for scale."""
    import torch
    from transformers import AutoModelForCausalLM

    from srppo_trl.models.logprobs import sequence_logprobs

    pt32 = AutoModelForCausalLM.from_pretrained(paths["pt"], dtype=torch.float32).eval()
    pt16 = AutoModelForCausalLM.from_pretrained(paths["pt"], dtype=torch.bfloat16).eval()

    def reward(sft, pt, ctx):
        with torch.no_grad(), ctx():
            sums = [sequence_logprobs(m, sequences, attention, response_mask).sum(1) for m in (sft, pt)]
        return (sums[0] - sums[1]).double()

    reference = reward(sft32, pt32, nullcontext)
    errors = {}
    for name, (sft, pt, ctx) in {
        "autocast bf16": (sft32, pt32, autocast),
        "bf16 weights": (sft16, pt16, nullcontext),
    }.items():
        diff = reward(sft, pt, ctx) - reference
        errors[name] = {"max_abs_err": float(diff.abs().max()), "batch_mean_abs_err": float(diff.mean().abs())}
    return {"fp32_mean": float(reference.mean()), "fp32_std": float(reference.std()), "errors": errors}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("small", "large"), default="small", help="8x32 or 32x64")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per pass (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $SRPPO_CACHE or ~/.cache/srppo_trl)")
    args = parser.parse_args(argv)
    os.environ["SRPPO_BENCH_SHAPE"] = args.shape  # read by bench_common at import

    import bench_common as bc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from srppo_trl.models.logprobs import sequence_logprobs

    torch.set_num_threads(args.threads)
    paths = bc.prepare_models(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    fp32 = AutoModelForCausalLM.from_pretrained(paths["sft"], dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(paths["sft"], dtype=torch.bfloat16).eval()
    for model in (fp32, bf16):
        model.generation_config.eos_token_id = None
    batch = bc.left_padded_batch(tokenizer)
    gen_config = GenerationConfig(**bc.generation_kwargs(tokenizer))
    torch.manual_seed(bc.SEED)
    with torch.no_grad():
        sequences = fp32.generate(**batch, generation_config=gen_config)
    prompt_len = batch["input_ids"].shape[1]
    attention = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, prompt_len:])], dim=1)
    response_mask = torch.zeros_like(sequences)
    response_mask[:, prompt_len:] = 1

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def score(model, ctx):
        def run():
            with ctx():
                return sequence_logprobs(model, sequences, attention, response_mask)

        return run

    results = {}
    reference = None
    for name, model, ctx in (
        ("scoring fp32", fp32, nullcontext),
        ("scoring autocast bf16", fp32, autocast),
        ("scoring bf16 weights", bf16, nullcontext),
    ):
        times, logps = _time(score(model, ctx), args.reps)
        row = {"s": times}
        if reference is None:
            reference = logps
        else:
            mask = response_mask.bool()
            diff = (logps - reference).abs()[mask]
            row["max_abs_err"] = float(diff.max())
            row["mean_abs_err"] = float(diff.mean())
            row["max_abs_err_sum"] = float((logps.sum(1) - reference.sum(1)).abs().max())
        results[name] = row
        print(f"[{name}] {statistics.median(times):.3f} s", file=sys.stderr)

    advantages = torch.randn(response_mask.shape, generator=torch.Generator().manual_seed(0)) * response_mask
    fp32.train()

    def train_step(ctx):
        def run():
            fp32.zero_grad(set_to_none=True)
            with ctx():
                logps = sequence_logprobs(fp32, sequences, attention, response_mask, requires_grad=True)
            loss = -(logps * advantages).sum() / response_mask.sum()
            loss.backward()
            return torch.cat([p.grad.flatten() for p in fp32.parameters() if p.grad is not None])

        return run

    grads = {}
    for name, ctx in (("train step fp32", nullcontext), ("train step autocast bf16", autocast)):
        times, grads[name] = _time(train_step(ctx), args.reps)
        results[name] = {"s": times}
        print(f"[{name}] {statistics.median(times):.3f} s", file=sys.stderr)
    ref, other = grads["train step fp32"], grads["train step autocast bf16"]
    ref, other = ref.double(), other.double()  # 135 M-element sums: fp32 accumulation is not accurate enough
    results["train step autocast bf16"]["grad_rel_err"] = float((other - ref).norm() / ref.norm())
    results["train step autocast bf16"]["grad_cosine"] = float(ref @ other / (ref.norm() * other.norm()))
    fp32.eval()

    for name, model, ctx in (
        ("generation fp32", fp32, nullcontext),
        ("generation autocast bf16", fp32, autocast),
        ("generation bf16 weights", bf16, nullcontext),
    ):

        def run(model=model, ctx=ctx):
            with torch.no_grad(), ctx():
                return model.generate(**batch, generation_config=gen_config)

        times, _ = _time(run, args.reps)
        results[name] = {"s": times}
        print(f"[{name}] {statistics.median(times):.3f} s", file=sys.stderr)

    reward = _coherent_reward_errors(paths, fp32, bf16, sequences, attention, response_mask, autocast)

    base = {"scoring": "scoring fp32", "train step": "train step fp32", "generation": "generation fp32"}
    print("| pass | median s | / fp32 | max abs log-prob err | mean abs err | max err of a response's sum |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        median = statistics.median(row["s"])
        row["median_s"] = median
        fp32_name = next(v for k, v in base.items() if name.startswith(k))
        row["over_fp32"] = median / statistics.median(results[fp32_name]["s"])
        errs = [f"{row[k]:.4f}" if k in row else "-" for k in ("max_abs_err", "mean_abs_err", "max_abs_err_sum")]
        print(f"| {name} | {median:.3f} | {row['over_fp32']:.2f} | " + " | ".join(errs) + " |")
    step = results["train step autocast bf16"]
    print(f"\ngradient of the bf16 train step vs fp32: relative error {step['grad_rel_err']:.4f}, cosine "
          f"{step['grad_cosine']:.5f}")  # fmt: skip
    print("\ncoherent reward (sum log p_SFT - sum log p_PT over a response) against fp32, nats:")
    print("| passes | max abs err of a response's reward | abs err of the batch mean | fp32 rewards' std |")
    print("|---|---|---|---|")
    for name, row in reward["errors"].items():
        print(f"| {name} | {row['max_abs_err']:.4f} | {row['batch_mean_abs_err']:.4f} | {reward['fp32_std']:.4f} |")
    results["coherent reward"] = reward
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "flags": _cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }
    print(f"machine: {machine}")
    shape = {"prompts": len(bc.PROMPTS), "new_tokens": bc.RESPONSE_LENGTH, "tokens": list(sequences.shape)}
    print(json.dumps({"shape": shape, "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
