"""The fixed benchmark configuration, shared by `bench_update.py` (srppo-trl's venv) and `peer_trl112_ppo.py` (the
TRL 1.12 venv). Imports torch and transformers only, so both environments can load it.

Models (all on disk under `<cache>/bench/`, written once by `prepare_models` in srppo-trl's venv):
- `sft/`: SmolLM2-135M-Instruct (from `srppo_trl.smollm2`), the SFT model, initial policy and critic backbone.
- `pt/`: the "pretrained" model: SmolLM2 with a random rank-8 perturbation SUBTRACTED from every attention and MLP
  projection of every layer (q, k, v, o, gate, up, down; 210 matrices), `W_pt = W - B0 @ A0` with
  `||B0 @ A0||_F = PERTURB_REL * ||W||_F` per matrix (seed 0). Embeddings and norms are untouched.
- `sft_adapter/`: the LoRA adapter (r=8, alpha=8, same targets) with `lora_A = A0`, `lora_B = B0`, so that
  `pt + sft_adapter` equals `sft` up to fp32 rounding: four-model and single-base mode run the same SFT and PT models.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch


SMALL_PROMPTS = [
    "Give me three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Name two primary colors.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]
MORE_PROMPTS = [
    "Describe a rainbow to a child.",
    "List three uses of a paperclip.",
    "What does a thermometer measure?",
    "Suggest a name for a pet turtle.",
    "Summarise the story of Cinderella in one sentence.",
    "How many legs does a spider have?",
    "Write a short thank-you note to a teacher.",
    "What is the opposite of 'ancient'?",
    "Give an example of a renewable energy source.",
    "Explain why we need sleep.",
    "What is 12 times 12?",
    "Name a famous painting and its painter.",
    "How do plants make food?",
    "Write a two-line poem about autumn.",
    "What is the tallest mountain on Earth?",
    "Give me a tip for learning a new language.",
    "Why do cats purr?",
    "What is the boiling point of water in Celsius?",
    "Name three fruits that are red.",
    "Explain what a verb is.",
    "How does a bicycle stay upright?",
    "Write a sentence using the word 'gentle'.",
    "What causes the seasons?",
    "Suggest a healthy breakfast.",
]
# The shape: SRPPO_BENCH_SHAPE=small (default: 8 prompts x 32 new tokens) or large (32 prompts x 64 new tokens), read
# from the environment so that the peer's venv gets the same shape (`bench_update.py --shape` sets it).
SHAPES = {"small": (8, 32), "large": (32, 64)}
SHAPE = os.environ.get("SRPPO_BENCH_SHAPE", "small")
if SHAPE not in SHAPES:
    raise ValueError(f"SRPPO_BENCH_SHAPE must be one of {sorted(SHAPES)}, got {SHAPE!r}.")
PROMPTS = (SMALL_PROMPTS + MORE_PROMPTS)[: SHAPES[SHAPE][0]]
BATCH = len(PROMPTS)  # prompts per update
RESPONSE_LENGTH = SHAPES[SHAPE][
    1
]  # new tokens per response, exactly: the stop token is disabled so every run does the same work
LEARNING_RATE = 1e-6
KL_COEF = 0.05
VF_COEF = 0.1
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PERTURB_REL = 0.05
SEED = 0


def chat_prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def tokenized_prompts(tokenizer) -> list[list[int]]:
    """Prompt token ids, exactly as `SRPPOTrainer._prepare_dataset` tokenizes chat prompts."""
    return [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for m in chat_prompts()
    ]


def left_padded_batch(tokenizer) -> dict:
    tokenizer.padding_side = "left"
    return tokenizer.pad({"input_ids": tokenized_prompts(tokenizer)}, padding=True, return_tensors="pt")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


class Timer:
    """Accumulates wall-clock seconds per named phase: `with timer("generation"): ...`."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.peak_rss_after: dict[str, float] = {}  # process peak RSS (MB) when each phase last ended

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1
        self.peak_rss_after[name] = peak_rss_mb()

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.add(name, time.perf_counter() - self.start)

        return _Span()

    def wrap(self, obj, method: str, name: str, when=None):
        """Replace `obj.method` by a timed version (optionally only when `when()` is true)."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            if when is not None and not when():
                return original(*args, **kwargs)
            with self(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)
        return original

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


def generation_kwargs(tokenizer) -> dict:
    """Sampling at temperature 1, no top-k/top-p, no stop token: RESPONSE_LENGTH new tokens, always."""
    return dict(
        max_new_tokens=RESPONSE_LENGTH,
        do_sample=True,
        temperature=1.0,
        top_k=0,  # None would be filled with transformers' default, top-50
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )


def model_paths(cache_dir: str | Path) -> dict[str, Path]:
    root = Path(cache_dir) / "bench"
    return {"sft": root / "sft", "pt": root / "pt", "sft_adapter": root / "sft_adapter"}


def prepare_models(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Writes sft/, pt/ and sft_adapter/ once (srppo-trl's venv: needs peft and `srppo_trl.smollm2`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_trl.smollm2 import default_cache_dir, prepare_smollm2

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = model_paths(cache_dir)
    if all((p / "config.json").exists() or (p / "adapter_config.json").exists() for p in paths.values()):
        return paths
    source = prepare_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    sft = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    sft.save_pretrained(paths["sft"], safe_serialization=True)
    tokenizer.save_pretrained(paths["sft"])

    generator = torch.Generator().manual_seed(SEED)
    factors = {}
    pt = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, module in pt.named_modules():
            if name.split(".")[-1] in LORA_TARGETS and isinstance(module, torch.nn.Linear):
                weight = module.weight
                a = torch.randn(LORA_RANK, weight.shape[1], generator=generator)
                b = torch.randn(weight.shape[0], LORA_RANK, generator=generator)
                delta = b @ a
                scale = PERTURB_REL * weight.norm() / delta.norm()
                b = b * scale
                weight.sub_(b @ a)
                factors[name] = (a, b)
    pt.save_pretrained(paths["pt"], safe_serialization=True)
    tokenizer.save_pretrained(paths["pt"])

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(pt, config)
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if name in factors:
                a, b = factors[name]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(paths["sft_adapter"])
    (paths["sft_adapter"] / "PERTURBATION.json").write_text(
        json.dumps({"rank": LORA_RANK, "relative_frobenius_norm": PERTURB_REL, "targets": LORA_TARGETS, "seed": SEED})
    )
    return paths
