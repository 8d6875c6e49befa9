"""How well a top-layer critic (`build_single_base(..., critic_top_layers=k)`) fits the returns, against the default
critic that trains every layer: same rollouts, same updates, held-out error per buffer.

    python benchmarks/bench_critic_fit.py                                   # full, top 8, top 4; 12 buffers each
    python benchmarks/bench_critic_fit.py --variants full,8 --buffers 20 --critic-lr 1e-4

Single-base SRPPO on the benchmark models of `bench_update.py` (`bench_common.py`: SmolLM2-135M-Instruct as SFT =
a rank-8-perturbed copy + its LoRA adapter; 8 prompts x 32 sampled tokens per buffer, small shape). Every buffer is a
critic warm-up buffer (`critic_warmup_steps` = all of them): the actor never moves, so with the RNG reseeded before
`train()` every variant sees the very same rollouts and the comparison is paired. The critic's error on a buffer is
measured from its values at rollout time, before it trains on that buffer: `val/abs_error` (mean |return - value| over
response tokens) and `val/bias` (mean return - value), as `SRPPOTrainer` logs them. `lam=1, gamma=1` (returns are the
remaining coherent reward), `cliprange_value=None` (as the demo), 2 PPO epochs per buffer, critic lr `--critic-lr`.

Prints one row per variant (error on the first buffer: the untrained head; mean over the last half of the buffers;
seconds per buffer) and, last, one JSON line with every buffer's numbers. Timings here are for reading only (the
variants run one after another in one process); `bench_update.py` measures speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402


def _run_variant(top_layers: int | None, args, cache_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_trl import SRPPOConfig, SRPPOTrainer
    from srppo_trl.single_base import build_single_base

    paths = bc.model_paths(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    base = AutoModelForCausalLM.from_pretrained(paths["pt"], dtype=torch.float32)
    policy, reward, critic = build_single_base(
        base, sft_adapter=str(paths["sft_adapter"]), critic_top_layers=top_layers
    )
    policy.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as output_dir:
        config = SRPPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=bc.BATCH,
            num_mini_batches=1,
            num_ppo_epochs=args.epochs,
            response_length=bc.RESPONSE_LENGTH,
            local_rollout_forward_batch_size=bc.BATCH,
            stop_token="eos",
            learning_rate=bc.LEARNING_RATE,
            critic_learning_rate=args.critic_lr,
            lr_scheduler_type="constant",
            critic_warmup_steps=args.buffers,  # the actor never moves: every variant sees the same rollouts
            max_steps=args.buffers * args.epochs,  # optimizer steps: one per epoch (one mini batch)
            lam=1.0,
            gamma=1.0,
            cliprange_value=None,
            kl_coef=bc.KL_COEF,
            vf_coef=bc.VF_COEF,
            temperature=1.0,
            activation_checkpointing=False,
            num_sample_generations=0,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            seed=bc.SEED,
            disable_tqdm=True,
        )
        trainer = SRPPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            reward_model=reward,
            value_model=critic,
            train_dataset=Dataset.from_dict({"prompt": bc.chat_prompts()}),
        )
        trainer.generation_config.eos_token_id = None
        # The same value head in every variant (building the adapters drew different amounts of random numbers).
        torch.manual_seed(bc.SEED)
        with torch.no_grad():
            torch.nn.init.normal_(critic.score.weight, std=1.0 / (critic.score.in_features + 1))
            critic.score.bias.zero_()
        torch.manual_seed(bc.SEED)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    rows = [r for r in trainer.state.log_history if "val/abs_error" in r]
    return {
        "critic_top_layers": top_layers,
        "abs_error": [r["val/abs_error"] for r in rows],
        "bias": [r["val/bias"] for r in rows],
        "scores": [r["objective/scores"] for r in rows],
        "trainable_critic_params": sum(p.numel() for p in critic.parameters()),
        "seconds": seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="full,8,4", help="'full' and/or numbers of trainable top layers")
    parser.add_argument("--buffers", type=int, default=12, help="rollout buffers (critic updates) per variant")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs per buffer")
    parser.add_argument("--critic-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $SRPPO_CACHE or ~/.cache/srppo_trl)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.cache_dir is None:
        from srppo_trl.smollm2 import default_cache_dir

        args.cache_dir = str(default_cache_dir())
    bc.prepare_models(args.cache_dir)

    results = []
    for name in args.variants.split(","):
        top = None if name == "full" else int(name)
        result = _run_variant(top, args, args.cache_dir)
        results.append(result)
        print(f"[{name}] {result['seconds']:.0f} s", file=sys.stderr)

    half = args.buffers // 2
    print(
        "| critic | trainable params | abs error, buffer 1 | mean abs error, last half | mean bias, last half | s / buffer |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        label = "every layer" if r["critic_top_layers"] is None else f"top {r['critic_top_layers']} layers"
        tail, bias = r["abs_error"][half:], r["bias"][half:]
        print(
            f"| {label} | {r['trainable_critic_params']:,} | {r['abs_error'][0]:.3f} | {sum(tail) / len(tail):.3f} | "
            f"{sum(bias) / len(bias):+.3f} | {r['seconds'] / args.buffers:.1f} |"
        )
    same = all(r["scores"] == results[0]["scores"] for r in results)
    print(f"\nsame rollouts in every variant (buffer scores equal): {same}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads}
    print(json.dumps({"args": vars(args), "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
