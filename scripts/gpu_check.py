"""GPU check: SRPPO updates in bf16 on random SmolLM2-shaped models, four-model, single-base LoRA and single-base QLoRA;
and (`pipeline`) the notebook's GPU configuration end to end on random Mistral-7B-shaped weights.

    python scripts/gpu_check.py                                   # on a CUDA machine: 360M shape, 64 prompts x 128 tokens
    python scripts/gpu_check.py --qlora-shape 1.7b --out $OUT/gpu_check.json
    python scripts/gpu_check.py --device cpu --dtype fp32 --shape tiny --prompts 4 --tokens 8 --buffers 2  # smoke (CI)
    python scripts/gpu_check.py pipeline --out $OUT/pipeline.json # SFT -> single-base SRPPO, 7B QLoRA: peak per phase
    python scripts/gpu_check.py pipeline --compute fp16          # the T4 path (fp16 compute) on a bf16-capable GPU
    python scripts/gpu_check.py pipeline --device cpu --shape tiny  # smoke (CI)

`pipeline` runs `srppo_trl.pipeline.run_pipeline` with the configuration of the notebook's GPU branch
(`GPU_CONFIG` in notebooks/srppo_lora_walkthrough.ipynb: single-base QLoRA, NF4 base, LoRA r16; fp16 compute where
the GPU has no bf16, as on a T4) on a base written with random weights of Mistral-7B's shape (no hub), and synthetic
data in the TULU/UltraFeedback schemas whose sequences are as long as the configuration allows (SFT examples of
`sft_max_length` tokens, prompts of `max_prompt_length`): the worst case of the configuration's memory. Only the
number of examples is shrunk (`--sft-steps`, `--prompts`, `--buffers`). It prints, for each phase (SFT, loading the
single-base models, generation, scoring, PPO update, evaluation), the seconds spent in it and the peak CUDA memory
allocated and reserved while it ran; the largest must fit the GPU the notebook is meant for (a T4 shows ~15 GiB).
The random base is written (fp16/bf16, ~14.5 GB for the 7B shape, shard by shard) to a temporary folder first.

Needs no network and no checkpoint: every model is built from a config (random weights), the prompts are random token
ids, and the tokenizer is `srppo_trl.testing.tiny_tokenizer` (its ids lie inside SmolLM2's vocabulary). Responses run
to `--tokens` exactly (`stop_token=None`), so every run does the same work. For each mode it prints and writes (JSON)
seconds per rollout buffer (median over the buffers after the first, which warms up kernels and allocators), the
phases of a buffer (generation, scoring, the optimizer steps) and the peak CUDA memory.

Modes:
- four_model: policy and critic trained in full (AdamW), SFT and PT frozen; four copies of the weights.
- single_base_lora: one copy of the base weights; SFT, policy and critic are LoRA adapters (`srppo_trl.single_base`).
- single_base_qlora: the same with the base loaded in 4 bits (bitsandbytes NF4, bf16 compute); CUDA only.

Reference figures (one H100, 360M shape, 64 prompts x 128 tokens, bf16): four-model 6.0 s/buffer, peak
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


# ---------------------------------------------------------------------------------------------- `pipeline` verb

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "srppo_lora_walkthrough.ipynb"
PIPELINE_SHAPES = {  # Mistral-7B-v0.1's configuration; "tiny" for CPU smoke runs
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, sliding_window=None),
}  # fmt: skip
PHASES = ("sft", "load_models", "generation", "scoring", "ppo_update", "evaluation", "other")


def parse_pipeline_args(argv):
    p = argparse.ArgumentParser(
        prog="gpu_check.py pipeline", description="The notebook's GPU configuration, end to end."
    )
    p.add_argument("--shape", choices=PIPELINE_SHAPES, default="mistral-7b")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--compute",
        choices=("auto", "bf16", "fp16"),
        default="auto",
        help="compute dtype of the 4-bit base (auto: bf16 where the GPU has it; fp16 is the T4 path)",
    )
    p.add_argument("--sft-steps", type=int, default=2, help="SFT optimizer steps")
    p.add_argument("--prompts", type=int, default=None, help="prompts per rollout buffer (default: the notebook's)")
    p.add_argument("--buffers", type=int, default=2, help="rollout buffers (the first is the critic warm-up)")
    p.add_argument("--tokens", type=int, default=None, help="response_length (default: the notebook's)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default: max_prompt_length)")
    p.add_argument("--sft-tokens", type=int, default=None, help="SFT example length (default: sft_max_length)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible.")
    return args


def notebook_gpu_config(bf16: bool, base_model: str) -> dict:
    """`GPU_CONFIG` of the notebook's configuration cell ({'pipe', 'model', 'args'} keyword arguments of
    PipelineArguments, ModelConfig and SRPPOConfig), evaluated with the cell's `BF16` and `BASE_MODEL`."""
    import ast

    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GPU_CONFIG" for t in node.targets):
                code = compile(ast.Expression(node.value), str(NOTEBOOK), "eval")
                return eval(code, {"dict": dict, "BF16": bf16, "BASE_MODEL": base_model})  # noqa: S307 - our notebook
    raise RuntimeError(f"No `GPU_CONFIG = ...` assignment in a code cell of {NOTEBOOK}.")


def write_random_base(shape: str, folder: Path, dtype, tokenizer, seed: int = 0, shard_bytes: int = 2**31) -> None:
    """A causal LM folder with random weights of `shape` (std 0.02, norms 1), written shard by shard so that a 7B base
    never sits whole in CPU memory (a Colab has ~12 GB), and `tokenizer`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype=dtype, **PIPELINE_SHAPES[shape],
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, index = {}, 0, index + 1

    for name, tensor_shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(tensor_shape, dtype=dtype)
        else:
            tensor = (torch.randn(tensor_shape, generator=generator) * 0.02).to(dtype)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * torch.tensor([], dtype=dtype).element_size()
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_synthetic_data(folder: Path, tokenizer, n_sft: int, n_prompts: int, sft_tokens: int, prompt_tokens: int):
    """TULU-v2 and UltraFeedback JSONL files (their schemas) with texts of random tokens: SFT conversations of about
    `sft_tokens` tokens, prompts of about `prompt_tokens` (the chat template included) - the longest the
    configuration takes. Returns (tulu_file, ultrafeedback_file)."""
    from srppo_trl.data import prompt_input_ids

    generator = torch.Generator().manual_seed(0)
    low = len(tokenizer.all_special_ids) + 8  # plain tokens only

    def text(n):
        return tokenizer.decode(torch.randint(low, len(tokenizer), (max(n, 1),), generator=generator).tolist())

    def prompt(n):
        content = text(n)
        overflow = len(prompt_input_ids([{"role": "user", "content": content}], tokenizer)) - prompt_tokens
        return text(n - overflow) if overflow > 0 else content

    prompt_len = max(prompt_tokens - 16, 1)
    tulu, ultrafeedback = folder / "tulu.jsonl", folder / "ultrafeedback.jsonl"
    with tulu.open("w") as f:
        for i in range(n_sft):
            user, answer = text(64), text(sft_tokens)  # SFT truncates to sft_max_length: every row is full
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"dataset": "synthetic", "id": f"synthetic_{i}", "messages": messages}) + "\n")
    with ultrafeedback.open("w") as f:
        for _ in range(n_prompts):
            row = {"source": "synthetic", "instruction": prompt(prompt_len), "models": [], "completions": []}
            f.write(json.dumps(row) + "\n")
    return tulu, ultrafeedback


class PhaseMeter:
    """Seconds and peak CUDA memory per phase. Phases nest (rollouts run inside a training step): the inner phase's
    time and memory are its own, and the outer phase resumes after it."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.stack = ["other"]
        self.stats = {name: {"seconds": 0.0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0} for name in PHASES}
        self.start = time.perf_counter()

    def _close_interval(self) -> None:
        now, stats = time.perf_counter(), self.stats[self.stack[-1]]
        stats["seconds"] += now - self.start
        self.start = now
        if self.cuda:
            torch.cuda.synchronize()
            stats["peak_allocated_gib"] = max(stats["peak_allocated_gib"], torch.cuda.max_memory_allocated() / 2**30)
            stats["peak_reserved_gib"] = max(stats["peak_reserved_gib"], torch.cuda.max_memory_reserved() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    def wrap(self, name: str, fn):
        def wrapper(*a, **kw):
            self._close_interval()
            self.stack.append(name)
            try:
                return fn(*a, **kw)
            finally:
                self._close_interval()
                self.stack.pop()

        return wrapper

    def summary(self) -> dict:
        self._close_interval()
        rows = {}
        for name, stats in self.stats.items():
            row = {"seconds": round(stats["seconds"], 1)}
            if self.cuda:
                row.update({k: round(v, 2) for k, v in stats.items() if k != "seconds"})
            rows[name] = row
        return rows


def _instrument(meter: PhaseMeter):
    """Wraps the pipeline's phases in `meter`; returns a function that undoes it."""
    import srppo_trl.pipeline.run as pipeline
    from srppo_trl.trainer import SRPPOTrainer

    targets = [
        (pipeline, "run_sft", "sft"), (pipeline, "build_single_base_models", "load_models"),
        (pipeline, "_sample_rewards", "evaluation"), (SRPPOTrainer, "generate_rollouts", "generation"),
        (SRPPOTrainer, "score_rollouts", "scoring"), (SRPPOTrainer, "training_step", "ppo_update"),
        (SRPPOTrainer, "evaluate", "evaluation"),
    ]  # fmt: skip
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    for owner, attr, phase in targets:
        setattr(owner, attr, meter.wrap(phase, getattr(owner, attr)))

    def undo():
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)

    return undo


def run_pipeline_check(argv=None) -> dict:
    """The `pipeline` verb: the notebook's GPU configuration end to end on random weights; peak memory per phase."""
    from trl import ModelConfig

    from srppo_trl import SRPPOConfig
    from srppo_trl.pipeline import PipelineArguments, run_pipeline
    from srppo_trl.testing import tiny_tokenizer

    args = parse_pipeline_args(argv)
    cuda = args.device == "cuda"
    bf16 = cuda and (torch.cuda.is_bf16_supported() if args.compute == "auto" else args.compute == "bf16")
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = notebook_gpu_config(bf16=bf16, base_model=str(tmp / "base"))
        pipe_kw, model_kw, srppo_kw = dict(config["pipe"]), dict(config["model"]), dict(config["args"])
        prompts = args.prompts or srppo_kw["rollout_batch_size"]
        n_eval = max(1, prompts // 4)
        sft_batch = pipe_kw["sft_per_device_train_batch_size"] * pipe_kw["sft_gradient_accumulation_steps"]
        tulu, ultrafeedback = write_synthetic_data(
            tmp, tokenizer, n_sft=sft_batch * args.sft_steps, n_prompts=prompts * args.buffers + n_eval,
            sft_tokens=args.sft_tokens or pipe_kw["sft_max_length"],
            prompt_tokens=args.prompt_tokens or srppo_kw["max_prompt_length"],
        )  # fmt: skip
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[model_kw["dtype"]] if cuda else torch.float32
        start = time.perf_counter()
        write_random_base(args.shape, tmp / "base", dtype, tokenizer)
        print(f"random {args.shape} base written in {time.perf_counter() - start:.0f} s", flush=True)
        pipe_kw.update(
            setting="min", tulu_source=str(tulu), ultrafeedback_source=str(ultrafeedback), tulu_num_samples=None,
            num_prompts=prompts * args.buffers, eval_num_prompts=n_eval, eval_num_samples=1, offline_eval_n=0,
            sft_max_steps=args.sft_steps,
        )  # fmt: skip
        srppo_kw.update(
            output_dir=str(tmp / "out"), rollout_batch_size=prompts, num_train_epochs=1,
            critic_warmup_steps=min(srppo_kw.get("critic_warmup_steps", 1), args.buffers - 1), save_strategy="no",
            report_to="none", disable_tqdm=True,
        )  # fmt: skip
        if args.tokens:
            srppo_kw["response_length"] = args.tokens
        if not cuda:  # bitsandbytes' 4-bit and fp16/bf16 mixed precision need CUDA: LoRA on an fp32 base here
            model_kw.update(load_in_4bit=False, dtype="float32", use_bnb_nested_quant=False)
            srppo_kw.update(bf16=False, fp16=False, use_cpu=True)
        meter = PhaseMeter(args.device)
        undo = _instrument(meter)
        result = {"verb": "pipeline", "device": device, "shape": args.shape, "dtype": model_kw["dtype"]}
        result["configuration"] = {"pipe": pipe_kw, "model": model_kw, "args": srppo_kw}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            output = run_pipeline(
                PipelineArguments(**pipe_kw), SRPPOConfig(**srppo_kw), ModelConfig(model_name_or_path=None, **model_kw)
            )
            result["results"] = output["results"]
            result["srppo_files"] = sorted(p.name for p in Path(output["srppo_model"]).iterdir())
        except Exception as exc:  # noqa: BLE001 - print the phases measured before the failure too
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            undo()
        result["phases"] = meter.summary()
        if cuda:
            result["peak_allocated_gib"] = max(p["peak_allocated_gib"] for p in result["phases"].values())
            result["peak_reserved_gib"] = max(p["peak_reserved_gib"] for p in result["phases"].values())
            result["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    print(f"device: {device}; pipeline check, {args.shape}, {model_kw['dtype']}", flush=True)
    for name, row in result["phases"].items():
        print(f"  {name:12s} {json.dumps(row)}", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("phases", "configuration", "results")}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pipeline"]:
        return [run_pipeline_check(argv[1:])]
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
