"""GPU check: SRPPO updates in bf16 on random SmolLM2-shaped models, four-model, single-base LoRA and single-base QLoRA.

    python scripts/gpu_check.py                                   # on a CUDA machine: 360M shape, 64 prompts x 128 tokens
    python scripts/gpu_check.py --qlora-shape 1.7b --out $OUT/gpu_check.json
    python scripts/gpu_check.py --device cpu --dtype fp32 --shape tiny --prompts 4 --tokens 8 --buffers 2  # smoke (CI)

Needs no network and no checkpoint: every model is built from a config (random weights), the prompts are random token
ids, and the tokenizer is `srppo_trl.testing.tiny_tokenizer` (its ids lie inside SmolLM2's vocabulary). Responses run
to `--tokens` exactly (`stop_token=None`), so every run does the same work. For each mode it prints and writes (JSON)
seconds per rollout buffer (median over the buffers after the first, which warms up kernels and allocators), the
phases of a buffer (generation, scoring, the optimizer steps) and the peak CUDA memory.

Modes:
- four_model: policy and critic trained in full (AdamW), SFT and PT frozen; four copies of the weights.
- single_base_lora: one copy of the base weights; SFT, policy and critic are LoRA adapters (`srppo_trl.single_base`).
- single_base_qlora: the same with the base loaded in 4 bits (bitsandbytes NF4, bf16 compute); CUDA only.

Reference figures (issue 13, one H100, 360M shape, 64 prompts x 128 tokens, bf16): four-model 6.0 s/buffer, peak
22.1 GB; single-base LoRA 10.6-16.1 s/buffer, peak 11.8 GB; single-base QLoRA on the 1.7B shape 13.6 s/buffer, peak
15.7 GB.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


SHAPES = {  # SmolLM2 configurations (hidden, intermediate, layers, heads, kv heads); "tiny" for CPU smoke runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
}  # fmt: skip
VOCAB = 49152
MODES = ("four_model", "single_base_lora", "single_base_qlora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="360m", help="shape of four_model and single_base_lora")
    p.add_argument("--qlora-shape", choices=SHAPES, default="1.7b", help="shape of single_base_qlora")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompts", type=int, default=64, help="prompts per rollout buffer")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per response (exactly)")
    p.add_argument("--buffers", type=int, default=3, help="rollout buffers per mode (the first is a warm-up)")
    p.add_argument("--micro-batch", type=int, default=16, help="per_device_train_batch_size")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"--modes must be a subset of {','.join(MODES)}, got {unknown}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible.")
    if args.prompts % args.micro_batch and args.micro_batch < args.prompts:
        p.error(f"--prompts ({args.prompts}) must be a multiple of --micro-batch ({args.micro_batch}).")
    return args


def _config(shape: str, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )


def _random_lm(config, seed: int, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def _sft_adapter(base, rank: int, seed: int):
    """A LoRA 'SFT adapter' with small random B (so SFT != PT and the reward is not 0)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    return peft_model


def _models(mode: str, args, tokenizer, dtype, tmp: Path):
    """(policy, reward_model, value_model) for `mode`; value_model None lets the trainer build it."""
    from srppo_trl import CoherentRewardModel
    from srppo_trl.single_base import build_single_base

    if mode == "four_model":
        config = _config(args.shape, tokenizer)
        policy = _random_lm(config, 0, dtype)
        return policy, CoherentRewardModel(copy.deepcopy(policy), _random_lm(config, 1, dtype)), None
    shape = args.shape if mode == "single_base_lora" else args.qlora_shape
    base = _random_lm(_config(shape, tokenizer), 1, dtype)
    if mode == "single_base_qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        base.save_pretrained(tmp / "base")
        del base
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        base = AutoModelForCausalLM.from_pretrained(tmp / "base", quantization_config=quantization, device_map="cuda")
    return build_single_base(_sft_adapter(base, args.lora_rank, seed=2))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_mode(mode: str, args, tokenizer) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from srppo_trl import SRPPOConfig, SRPPOTrainer

    if mode == "single_base_qlora" and args.device != "cuda":
        return {"mode": mode, "skipped": "4-bit (bitsandbytes) needs CUDA"}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (max(args.prompts, 1) * 2, args.prompt_tokens), generator=generator)
    prompts = Dataset.from_dict({"input_ids": ids.tolist()})
    micro = min(args.micro_batch, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward, value = _models(mode, args, tokenizer, dtype, Path(tmp))
        config = SRPPOConfig(
            output_dir=str(Path(tmp) / "run"),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=args.prompts // micro,
            rollout_batch_size=args.prompts,  # one optimizer step per buffer
            num_ppo_epochs=1,
            response_length=args.tokens,
            stop_token=None,  # every response has exactly --tokens tokens
            temperature=1.0,
            learning_rate=1e-6,
            critic_learning_rate=9e-6,
            max_steps=args.buffers,
            max_prompt_length=None,
            local_rollout_forward_batch_size=args.prompts,
            bf16=args.dtype == "bf16" and args.device == "cuda",
            activation_checkpointing=args.activation_checkpointing,
            use_cpu=args.device == "cpu",
            num_sample_generations=0,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = SRPPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            reward_model=reward,
            value_model=value,
            ref_model=None,
            train_dataset=prompts,
        )
        phases = {"generation": [], "scoring": [], "buffer": []}

        def timed(name, fn):
            def wrapper(*a, **kw):
                _sync(args.device)
                start = time.perf_counter()
                out = fn(*a, **kw)
                _sync(args.device)
                phases[name].append(time.perf_counter() - start)
                return out

            return wrapper

        trainer.generate_rollouts = timed("generation", trainer.generate_rollouts)
        trainer.score_rollouts = timed("scoring", trainer.score_rollouts)

        class BufferClock(TrainerCallback):
            start = None

            def on_step_begin(self, a, state, control, **kw):
                if state.global_step % a.steps_per_rollout == 0:
                    _sync(args.device)
                    self.start = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                if state.global_step % a.steps_per_rollout == 0 and self.start is not None:
                    _sync(args.device)
                    phases["buffer"].append(time.perf_counter() - self.start)

        trainer.add_callback(BufferClock())
        trainer.train()
        timed_from = 1 if len(phases["buffer"]) > 1 else 0

        def median(values):
            values = values[timed_from:] or values
            return round(statistics.median(values), 3) if values else None

        result = {
            "mode": mode,
            "shape": args.shape if mode != "single_base_qlora" else args.qlora_shape,
            "s_per_buffer": median(phases["buffer"]),
            "generation_s": median(phases["generation"]),
            "scoring_s": median(phases["scoring"]),
            "buffers": len(phases["buffer"]),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "loss_finite": all(
                torch.isfinite(torch.tensor(h["loss"])).item() for h in trainer.state.log_history if "loss" in h
            ),
        }
        if result["s_per_buffer"] is not None and result["generation_s"] is not None:
            result["optimisation_s"] = round(
                result["s_per_buffer"] - result["generation_s"] - (result["scoring_s"] or 0), 3
            )
        if args.device == "cuda":
            result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        del trainer, policy, reward, value
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from srppo_trl.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}; dtype {args.dtype}; {args.prompts} prompts x {args.tokens} "
          f"tokens per buffer; {args.buffers} buffers per mode", flush=True)  # fmt: skip
    results = []
    for mode in args.modes:
        try:
            result = run_mode(mode, args, tokenizer)
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others' figures
            result = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    results = main()
    sys.exit(1 if any("error" in r for r in results) else 0)
