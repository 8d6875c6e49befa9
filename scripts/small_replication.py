"""A resumable replication grid on SmolLM2-135M-Instruct, offline, on CPU: SFT, SFT (Extended), SRPPO, GRPO and SPIN.

Cells are (arm, seed); `base` is evaluated once. Per seed, in this order:

    sft           SFT on the shipped demonstrations (`--sft-epochs`); the seed sets the data order
    srppo         SRPPO from that SFT model: sequence-level coherent reward, `--critic-warmup` critic-only rollout
                  buffers, then actor + critic, on the demo PPO prompts (minimum overlap with the SFT prompts)
    sft_extended  the SFT model trained `--extended-epochs` more epochs (pick them to take about SRPPO's stage time:
                  the report puts the two times side by side)
    grpo          TRL's GRPOTrainer with the coherent reward (`make_coherent_reward_func`) on the same prompts, the
                  same samples per generation and per optimizer step, stopped at SRPPO's measured stage time
    spin          one SPIN iteration (TRL's DPOTrainer) from the SFT model, stopped at the same time budget

The seed sets the SFT data order, the sampling and the critic head's initialisation. Every cell is scored the same
way: the offline benchmark (in-domain and held-out instruction following, arithmetic; greedy, batched) and samples on
held-out PPO prompts (coherent reward, KL to the seed's SFT model, length, EOS rate). Each finished cell writes one
JSON file under `--raw-dir` (arm, seed, full config and its hash, per-prompt scores, timings, machine); models go
under `--output`. A rerun skips the cells whose JSON holds the same config hash, so a campaign can run in pieces:

    python scripts/small_replication.py --max-minutes 110 --commit     # as many cells as fit, one commit per cell
    python scripts/small_replication.py --report                       # docs/replication.md + PNG from raw files

`--max-minutes` never starts a cell that its arm's longest recorded cell says would not fit; `--commit` commits
each cell's JSON as it lands, so a campaign stopped midway loses at most the cell that was running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch


ARMS = ("base", "sft", "srppo", "sft_extended", "grpo", "spin")
# Run order within a seed: the arms whose budget is SRPPO's stage time right after it, on the same machine.
RUN_ORDER = ("sft", "srppo", "grpo", "spin", "sft_extended")
LABELS = {
    "base": "Base",
    "sft": "SFT",
    "sft_extended": "SFT (Extended)",
    "srppo": "SRPPO",
    "grpo": "GRPO",
    "spin": "SPIN",
}
# Which option groups define each arm's cell: a change to any of them reruns the cell (and only those cells).
OPTION_GROUPS = {
    "common": ("base_model", "eval_n", "eval_arithmetic", "eval_max_new_tokens", "eval_batch_size",
               "sample_prompts", "sample_n", "dataset_seed"),
    "sft": ("sft_epochs", "sft_lr", "sft_batch_size", "sft_max_length", "sft_max_steps"),
    "extended": ("extended_epochs",),
    "rl": ("num_prompts", "rollout_batch", "mini_batch", "ppo_epochs", "response_length", "max_prompt_length",
           "actor_lr", "critic_lr", "critic_warmup", "kl_coef", "lam", "missing_eos_penalty", "normalize_reward",
           "value_bias_init"),
    "grpo": ("grpo_num_generations", "grpo_max_steps"),
    "budget": ("budget_clock",),
    "spin": ("spin_lr", "spin_epochs", "spin_beta", "spin_batch_size", "spin_max_new_tokens"),
}  # fmt: skip
ARM_GROUPS = {
    "base": ("common",),
    "sft": ("common", "sft"),
    "sft_extended": ("common", "sft", "extended"),
    "srppo": ("common", "sft", "rl"),
    "grpo": ("common", "sft", "rl", "grpo", "budget"),  # its budget is the SRPPO cell's time
    "spin": ("common", "sft", "rl", "spin", "budget"),
}
RUNNER_VERSION = 1  # bump when a change to this script changes what a cell measures


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    # ---- the runner
    add("--output", default="outputs/replication", help="models and trainer folders (not committed)")
    add("--raw-dir", default="docs/replication/raw", help="one JSON per finished cell")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    add("--max-minutes", type=float, default=None, help="start no cell that would end after this many minutes")
    add("--commit", action="store_true", help="git add + git commit each cell's JSON as soon as it is written")
    add(
        "--budget-check",
        default="benchmarks/results/greedy_eval/replication_budget.txt",
        help="output of benchmarks/bench_greedy_eval.py on the replication's models, quoted by the report",
    )
    add("--report", action="store_true", help="only regenerate --report-md and its PNG from --raw-dir")
    add("--report-md", default="docs/replication.md")
    add("--report-png", default="docs/replication/replication.png")
    add("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training precision (auto: bf16 autocast on a CPU with AVX-512 BF16/AMX, else fp32; evaluation is fp32 "
        "either way). Recorded in each cell, not part of its config: a seed's GRPO and SPIN cells must run on the "
        "machine class (precision and CPU) of its SRPPO cell, whose time is their budget",
    )
    # ---- common: model, data, evaluation
    add("--base-model", default="smollm2", help="'smollm2' (offline) or a local model folder")
    add("--dataset-seed", type=int, default=42, help="the held-out / PPO prompt split (fixed across seeds)")
    add("--eval-n", type=int, default=150, help="offline benchmark prompts per instruction split")
    add("--eval-arithmetic", type=int, default=60, help="arithmetic problems")
    add("--eval-max-new-tokens", type=int, default=256, help="greedy response budget (the report gives truncation)")
    add("--eval-batch-size", type=int, default=64, help="greedy prompts per batch (rows leave a batch as they end)")
    add("--sample-prompts", type=int, default=64, help="held-out PPO prompts for the sample metrics")
    add("--sample-n", type=int, default=4, help="sampled responses per held-out PPO prompt")
    # ---- SFT and SFT (Extended)
    add("--sft-epochs", type=float, default=1, help="SFT epochs (the demo's 1; the paper's 2)")
    add("--sft-lr", type=float, default=5e-5)
    add("--sft-batch-size", type=int, default=8)
    add("--sft-max-length", type=int, default=256)
    add("--sft-max-steps", type=int, default=-1, help="steps per SFT run (-1: by epochs; tests use 1)")
    add(
        "--extended-epochs",
        type=float,
        default=3.5,
        help="SFT (Extended): epochs on top of the SFT model (3.5 x ~12 min on 2 AVX2 cores: about SRPPO's stage)",
    )
    # ---- SRPPO (GRPO and SPIN take its measured stage time as their budget)
    add(
        "--budget-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what GRPO's and SPIN's budget (SRPPO's stage time) counts: the process's CPU time (all its threads; "
        "equal compute even when other jobs share the cores) or wall time (an idle machine only)",
    )
    add("--num-prompts", type=int, default=256, help="PPO prompts, one pass (the first buffers train the critic)")
    add("--rollout-batch", type=int, default=8, help="prompts per rollout buffer")
    add("--mini-batch", type=int, default=4, help="prompts per optimizer step")
    add("--ppo-epochs", type=int, default=2)
    add("--response-length", type=int, default=48)
    add("--max-prompt-length", type=int, default=512)
    add("--actor-lr", type=float, default=2e-5)
    add("--critic-lr", type=float, default=1e-5)
    add("--critic-warmup", type=int, default=8, help="critic-only rollout buffers")
    add("--kl-coef", type=float, default=0.2)
    add("--lam", type=float, default=1.0)
    add("--missing-eos-penalty", type=float, default=1.0)
    add(
        "--normalize-reward",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SRPPOConfig.normalize_reward: scores divided by their running std before the KL penalty",
    )
    add(
        "--value-bias-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SRPPOConfig.value_bias_init: the critic head's bias starts at the first buffer's mean return (on: in "
        "benchmarks/results/critic_remedies a fresh head stays 15-20 nats below the returns)",
    )
    # ---- GRPO
    add("--grpo-num-generations", type=int, default=4, help="completions per prompt")
    add("--grpo-max-steps", type=int, default=None, help="default: SRPPO's samples / samples per generation x "
        "updates per generation (equal samples); the time budget usually ends it first")  # fmt: skip
    # ---- SPIN (recipes/configs/smollm2_demo_spin.yaml)
    add("--spin-lr", type=float, default=5e-6)
    add("--spin-epochs", type=float, default=2)
    add("--spin-beta", type=float, default=0.1)
    add("--spin-batch-size", type=int, default=8)
    add("--spin-max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    if args.rollout_batch % args.mini_batch:
        raise SystemExit(f"error: --rollout-batch {args.rollout_batch} must be a multiple of --mini-batch.")
    if args.rollout_batch % args.grpo_num_generations:
        raise SystemExit(
            f"error: --rollout-batch {args.rollout_batch} must be a multiple of --grpo-num-generations "
            f"{args.grpo_num_generations} (GRPO samples as many completions per generation as SRPPO's buffer)."
        )
    buffers = args.num_prompts // args.rollout_batch
    if buffers <= args.critic_warmup:
        raise SystemExit(
            f"error: {args.num_prompts} prompts make {buffers} rollout buffers, none left after --critic-warmup "
            f"{args.critic_warmup}: raise --num-prompts or lower --critic-warmup."
        )


# ---------------------------------------------------------------------------------------------- cells and the grid


def cell_config(args, arm: str, seed: int | None) -> dict:
    """Everything that defines what the cell measures (its hash decides whether a finished cell is reused)."""
    options = vars(args)
    config = {"arm": arm, "seed": seed, "runner_version": RUNNER_VERSION}
    for group in ARM_GROUPS[arm]:
        config.update({name: options[name] for name in OPTION_GROUPS[group]})
    return config


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def cell_name(arm: str, seed: int | None) -> str:
    return arm if arm == "base" else f"{arm}_seed{seed}"


def grid_cells(arms, seeds) -> list[tuple[str, int | None]]:
    """The cells in run order: base once, then per seed SFT before the arms that start from it, SRPPO and right
    after it the arms whose budget is its time (`RUN_ORDER`)."""
    cells = [("base", None)] if "base" in arms else []
    for seed in seeds:
        cells += [(arm, seed) for arm in RUN_ORDER if arm in arms]
    return cells


def read_cell(raw_dir: Path, arm: str, seed: int | None) -> dict | None:
    path = raw_dir / f"{cell_name(arm, seed)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(raw_dir: Path, arm: str, seed: int | None, config: dict) -> bool:
    cell = read_cell(raw_dir, arm, seed)
    return cell is not None and cell.get("config_hash") == config_hash(config)


def longest_recorded_s(raw_dir: Path, arm: str | None) -> float:
    """The longest wall time of a finished cell of `arm` (None: of any arm) in `raw_dir`, 0 if none."""
    pattern = "*.json" if arm is None else "base.json" if arm == "base" else f"{arm}_seed*.json"
    times = [json.loads(p.read_text())["timings"]["total_s"] for p in sorted(raw_dir.glob(pattern))]
    return max(times, default=0.0)


def run_grid(
    cells,
    done,
    run_cell,
    max_minutes=None,
    estimate_s=lambda cell: 0.0,
    clock=time.monotonic,
    log=print,
    blocked=lambda cell: None,
):
    """Runs the cells not `done`, in order, until the next one would end after `max_minutes` (by `estimate_s`).
    A cell for which `blocked(cell)` gives a reason is left for another run, and the grid goes on.

    Returns {'ran': [...], 'skipped': [...], 'blocked': [...], 'stopped_before': the first cell not started, or None}.
    """
    start = clock()
    result = {"ran": [], "skipped": [], "blocked": [], "stopped_before": None}
    for cell in cells:
        if done(cell):
            result["skipped"].append(cell)
            continue
        reason = blocked(cell)
        if reason:
            log(f"leaving {cell_name(*cell)} for another run: {reason}")
            result["blocked"].append(cell)
            continue
        if max_minutes is not None and (clock() - start + estimate_s(cell)) / 60 > max_minutes:
            result["stopped_before"] = cell
            log(f"--max-minutes {max_minutes}: stopping before {cell_name(*cell)} (rerun to continue).")
            break
        run_cell(cell)
        result["ran"].append(cell)
    return result


def commit_cell(path: Path, message: str, tries: int = 5, wait_s: float = 3.0) -> None:
    """`git add` + `git commit` of this one file, in the repository that holds it. Retried a few times (another git
    command holding the index lock); a commit that still fails is reported, not raised: the cell's file is written
    and the next run's `--commit` or a manual commit picks it up."""
    cwd = path.parent
    for attempt in range(tries):
        added = subprocess.run(["git", "add", path.name], cwd=cwd, capture_output=True, text=True)
        done = added.returncode == 0 and (
            subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", path.name], cwd=cwd, capture_output=True, text=True
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(wait_s * (attempt + 1))
    print(f"warning: could not commit {path} (commit it by hand: git add {path} && git commit)", flush=True)


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a CPU with bf16 instructions (AVX-512 BF16, AMX), else 'fp32'."""
    from srppo_trl.trainer.precision import cpu_has_fast_bf16

    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def machine_class(precision: str, cpu_flags: list[str]) -> str:
    """What decides a cell's speed: the precision and the best of the CPU's vector extensions, e.g. 'bf16/amx_bf16'.
    A seed's GRPO and SPIN cells take its SRPPO cell's time as budget, so they must run on the same class."""
    best = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in cpu_flags), "other")
    return f"{precision}/{best}"


def machine_info() -> dict:
    """CPU model and the vector flags that decide speed (AVX2/AVX-512/AMX), cores, torch threads, load average."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------- one cell


def cpu_seconds() -> float:
    """This process's CPU time, all threads (`time.process_time`)."""
    return time.process_time()


class WallClockBudget:
    """A `TrainerCallback` that stops training at the first optimizer step ending after `deadline` of `clock`
    (`time.monotonic`: wall time; `cpu_seconds`: this process's CPU time)."""

    def __init__(self, deadline: float, clock=time.monotonic):
        from transformers import TrainerCallback

        self.deadline, self.stopped, self.clock = deadline, False, clock
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.clock() >= outer.deadline:
                    outer.stopped = control.should_training_stop = True
                return control

        self.callback = _Callback()


class Campaign:
    """The shared state of a run: tokenizer, data, and the per-seed models it builds or reuses."""

    def __init__(self, args):
        from srppo_trl.pipeline import build_stage_data, load_tokenizer, resolve_base_model

        self.args, self.out, self.raw_dir = args, Path(args.output), Path(args.raw_dir)
        self.precision = resolve_precision(args.precision)
        self.machine_class = machine_class(self.precision, machine_info()["cpu_flags"])
        self.base_path = resolve_base_model(args.base_model)
        self.tokenizer = load_tokenizer(self.base_path)
        self.pipe = self.pipeline_arguments()
        self.stages, self.prompts, self.eval_prompts = build_stage_data(self.pipe)
        if len(self.eval_prompts) < args.sample_prompts:
            raise SystemExit(f"error: only {len(self.eval_prompts)} held-out PPO prompts; lower --sample-prompts.")

    def pipeline_arguments(self, **changes):
        from srppo_trl.pipeline import PipelineArguments

        a = self.args
        pipe = PipelineArguments(
            base_model=self.base_path, setting="demo", num_prompts=a.num_prompts, eval_num_prompts=a.sample_prompts,
            eval_num_samples=0, dataset_seed=a.dataset_seed, sft_learning_rate=a.sft_lr,
            sft_num_train_epochs=a.sft_epochs, sft_per_device_train_batch_size=a.sft_batch_size,
            sft_max_length=a.sft_max_length, sft_max_steps=a.sft_max_steps,
        )  # fmt: skip
        for name, value in changes.items():
            setattr(pipe, name, value)
        return pipe

    def model_args(self):
        from trl import ModelConfig

        return ModelConfig(dtype="float32")

    def trainer_args(self, folder: Path, seed: int, **fields):
        from srppo_trl import SRPPOConfig

        # activation_checkpointing off: faster on CPU, memory is not the limit at 135M. The committed cells ran before
        # bf16 CPU runs took the attention backward in fp32, which rounds gradients differently, and before rollouts
        # drew tokens by inverse transform, which uses the random stream differently: both kept as they were, so
        # that a cell run now (a missing or changed one) trains as those did.
        return SRPPOConfig(
            output_dir=str(folder), seed=seed, report_to="none", logging_steps=1, save_strategy="no",
            activation_checkpointing=False, bf16=self.precision == "bf16", cpu_attention_fp32_backward=False,
            rollout_sampler="multinomial", **fields,
        )  # fmt: skip

    # ---- models the cells share

    def model_folder(self, arm: str, seed: int, build) -> str:
        """The folder of this seed's `arm` model, reused when it was built with the same config, else rebuilt; its
        `cell_config.json` records the config and the build time (`build_s`)."""
        config = cell_config(self.args, arm, seed)
        folder = self.out / f"seed{seed}" / arm
        marker = folder / "cell_config.json"
        model = folder / "sft"
        if marker.is_file() and json.loads(marker.read_text()).get("hash") == config_hash(config):
            if (model / "config.json").is_file():
                return str(model)
        shutil.rmtree(folder, ignore_errors=True)
        start = time.monotonic()
        build(folder)
        record = {"hash": config_hash(config), "config": config, "build_s": _since(start)}
        marker.write_text(json.dumps(record, indent=1))
        return str(model)

    def build_s(self, arm: str, seed: int) -> float:
        """How long this seed's `arm` model took to train (whichever run built it)."""
        return json.loads((self.out / f"seed{seed}" / arm / "cell_config.json").read_text())["build_s"]

    def sft_path(self, seed: int) -> str:
        from srppo_trl.pipeline import run_sft

        def build(folder):
            args = self.trainer_args(folder, seed)
            run_sft(self.pipe, args, self.model_args(), self.base_path, self.tokenizer, self.stages, None)

        return self.model_folder("sft", seed, build)

    def load(self, path: str):
        from srppo_trl.pipeline import load_causal_lm, model_init_kwargs

        return load_causal_lm(path, model_init_kwargs(self.model_args()))

    def reward(self, seed: int):
        from srppo_trl.pipeline import build_reward, model_init_kwargs

        return build_reward(self.pipe, self.sft_path(seed), self.base_path, model_init_kwargs(self.model_args()))

    # ---- the arms: each returns (policy, training record)

    def train_sft(self, seed):
        path = self.sft_path(seed)
        return self.load(path), {"model": path, "epochs": self.args.sft_epochs, "train_s": self.build_s("sft", seed)}

    def train_sft_extended(self, seed):
        from srppo_trl.pipeline import run_sft

        sft = self.sft_path(seed)
        pipe = self.pipeline_arguments(sft_num_train_epochs=self.args.extended_epochs)

        def build(folder):
            args = self.trainer_args(folder, seed)
            run_sft(pipe, args, self.model_args(), sft, self.tokenizer, self.stages, None)

        path = self.model_folder("sft_extended", seed, build)
        record = {
            "model": path,
            "extra_epochs": self.args.extended_epochs,
            "train_s": self.build_s("sft_extended", seed),
        }
        return self.load(path), record

    def srppo_fields(self) -> dict:
        a = self.args
        return dict(
            per_device_train_batch_size=a.mini_batch, gradient_accumulation_steps=1, rollout_batch_size=a.rollout_batch,
            num_ppo_epochs=a.ppo_epochs, num_train_epochs=1, response_length=a.response_length,
            max_prompt_length=a.max_prompt_length, learning_rate=a.actor_lr, temperature=1.0,
        )  # fmt: skip

    def train_srppo(self, seed):
        from srppo_trl.pipeline import run_rl

        a = self.args
        sft = self.sft_path(seed)
        folder = self.out / f"seed{seed}" / "srppo"
        shutil.rmtree(folder, ignore_errors=True)
        args = self.trainer_args(
            folder, seed, **self.srppo_fields(), critic_learning_rate=a.critic_lr, critic_warmup_steps=a.critic_warmup,
            kl_coef=a.kl_coef, cliprange_value=None, lam=a.lam, reward_clip=None,
            normalize_reward=a.normalize_reward, value_bias_init=a.value_bias_init,
            missing_eos_penalty=a.missing_eos_penalty, stop_token="eos", reward_granularity="sequence",
            local_rollout_forward_batch_size=8, num_sample_generations=0,
        )  # fmt: skip
        no_eval = self.eval_prompts.select([])  # the cell's own evaluation scores every arm alike
        start, start_cpu = time.monotonic(), cpu_seconds()
        trainer, _, _ = run_rl(
            self.pipe, args, self.model_args(), sft, self.base_path, self.tokenizer, self.prompts, no_eval, None
        )
        stage_s, stage_cpu_s = _since(start), round(cpu_seconds() - start_cpu, 1)
        trainer.save_model(str(folder))  # the policy, for later inspection (not part of the stage time)
        record = {
            "stage_s": stage_s,
            "stage_cpu_s": stage_cpu_s,
            "model": str(folder),
            "optimizer_steps": trainer.state.global_step,
            "rollout_buffers": len(self.prompts) // a.rollout_batch,
            "log_history": trainer.state.log_history,
        }
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        return policy, record

    def budget_problem(self, seed) -> str | None:
        """Why this seed's GRPO and SPIN cells cannot run here now (None: they can)."""
        srppo = read_cell(self.raw_dir, "srppo", seed)
        if srppo is None or srppo["config_hash"] != config_hash(cell_config(self.args, "srppo", seed)):
            return (
                f"the GRPO and SPIN cells of seed {seed} take the SRPPO cell's stage time as their budget: run the "
                "srppo arm of that seed first (with the same settings)"
            )
        if srppo.get("machine_class") != self.machine_class:
            return (
                f"seed {seed}'s SRPPO cell ran on {srppo.get('machine_class')} and this machine is "
                f"{self.machine_class}: its stage time is a budget only on the same class of machine"
            )
        if self.args.budget_clock == "cpu" and "stage_cpu_s" not in srppo["training"]:
            return (
                f"seed {seed}'s SRPPO cell has no CPU time (an older runner made it): rerun it, or --budget-clock wall"
            )
        return None

    def blocked(self, cell) -> str | None:
        arm, seed = cell
        return self.budget_problem(seed) if arm in ("grpo", "spin") else None

    def budget_s(self, seed) -> float:
        problem = self.budget_problem(seed)
        if problem:
            raise SystemExit(f"error: {problem}.")
        training = read_cell(self.raw_dir, "srppo", seed)["training"]
        return training["stage_cpu_s"] if self.args.budget_clock == "cpu" else training["stage_s"]

    def budget_callback(self, budget: float) -> WallClockBudget:
        """Stops a GRPO or SPIN stage once it has spent `budget` seconds of `--budget-clock` from now."""
        clock = cpu_seconds if self.args.budget_clock == "cpu" else time.monotonic
        return WallClockBudget(clock() + budget, clock)

    def train_grpo(self, seed):
        from srppo_trl.pipeline import trl_group_trainer

        a = self.args
        budget = self.budget_s(seed)
        start, start_cpu = time.monotonic(), cpu_seconds()
        stop = self.budget_callback(budget)
        sft = self.sft_path(seed)
        folder = self.out / f"seed{seed}" / "grpo"
        shutil.rmtree(folder, ignore_errors=True)
        updates_per_generation = (a.rollout_batch // a.mini_batch) * a.ppo_epochs
        max_steps = a.grpo_max_steps or (len(self.prompts) // a.rollout_batch) * updates_per_generation
        # The same samples per generation (one SRPPO rollout buffer), per optimizer step (a mini batch) and the same
        # number of updates per generation (PPO epochs -> GRPO iterations).
        extra = dict(
            num_generations=a.grpo_num_generations, steps_per_generation=a.rollout_batch // a.mini_batch,
            num_iterations=a.ppo_epochs, max_steps=max_steps,
        )  # fmt: skip
        pipe = self.pipeline_arguments(algorithm="grpo", group_trainer_extra=extra)
        args = self.trainer_args(folder, seed, **self.srppo_fields(), kl_coef=a.kl_coef)
        reward = self.reward(seed)
        trainer = trl_group_trainer(pipe, args, self.load(sft), reward, self.tokenizer, self.prompts, None)
        trainer.add_callback(stop.callback)
        trainer.train()
        stage_s, stage_cpu_s = _since(start), round(cpu_seconds() - start_cpu, 1)
        trainer.save_model(str(folder))
        record = {
            "budget_s": budget, "budget_clock": a.budget_clock, "stage_s": stage_s, "stage_cpu_s": stage_cpu_s,
            "model": str(folder), "optimizer_steps": trainer.state.global_step,
            "max_steps": max_steps, "stopped_by_budget": stop.stopped, "group_trainer_extra": extra,
            "log_history": trainer.state.log_history,
        }  # fmt: skip
        return trainer.accelerator.unwrap_model(trainer.model), record

    def train_spin(self, seed):
        from datasets import concatenate_datasets

        from srppo_trl.pipeline import model_init_kwargs
        from srppo_trl.pipeline.spin import build_spin_dpo_values, run_spin, spin_generation_config

        a = self.args
        budget = self.budget_s(seed)
        start, start_cpu = time.monotonic(), cpu_seconds()
        stop = self.budget_callback(budget)
        sft = self.sft_path(seed)
        folder = self.out / f"seed{seed}" / "spin"
        shutil.rmtree(folder, ignore_errors=True)
        pipe = self.pipeline_arguments(
            algorithm="spin", spin_generation_max_new_tokens=a.spin_max_new_tokens,
            spin_trainer_extra={"beta": a.spin_beta, "loss_type": "sigmoid", "max_length": a.sft_max_length},
        )  # fmt: skip
        args = self.trainer_args(
            folder, seed, learning_rate=a.spin_lr, num_train_epochs=a.spin_epochs, lr_scheduler_type="linear",
            warmup_steps=0.1, per_device_train_batch_size=a.spin_batch_size, gradient_accumulation_steps=1,
        )  # fmt: skip
        if a.sft_max_steps > 0:  # the tests' tiny runs: as many DPO steps as SFT steps
            args.max_steps = a.sft_max_steps
        demonstrations = concatenate_datasets([d.select_columns(["messages"]) for _, d in self.stages])
        records = run_spin(
            sft, demonstrations, self.tokenizer, folder, iterations=1,
            dpo_values=build_spin_dpo_values(pipe, args), generation=spin_generation_config(pipe, seed),
            model_kwargs=model_init_kwargs(self.model_args()), callbacks=[stop.callback],
        )  # fmt: skip
        record = {
            "budget_s": budget, "budget_clock": a.budget_clock, "stage_s": _since(start),
            "stage_cpu_s": round(cpu_seconds() - start_cpu, 1), "stopped_by_budget": stop.stopped,
            "iterations": [asdict(r) for r in records],
        }  # fmt: skip
        return self.load(records[-1].model), record

    def train_base(self, seed):
        return self.load(self.base_path), {"model": self.base_path}

    # ---- one cell, end to end

    def run_cell(self, cell) -> Path:
        arm, seed = cell
        config = cell_config(self.args, arm, seed)
        print(f"\n=== cell {cell_name(arm, seed)} ({config_hash(config)}) ===", flush=True)
        machine = machine_info()
        start = time.monotonic()
        if seed is not None:
            torch.manual_seed(seed)
        policy, training = getattr(self, f"train_{arm}")(seed)
        train_s = _since(start)
        t = time.monotonic()
        summary, per_prompt = self.evaluate(policy, None if arm == "base" else seed)
        eval_s = _since(t)
        machine["load_avg_end"] = list(os.getloadavg())
        payload = {
            "arm": arm, "label": LABELS[arm], "seed": seed, "config_hash": config_hash(config), "config": config,
            "summary": summary, "per_prompt": per_prompt, "training": training,
            "timings": {"train_s": train_s, "eval_s": eval_s, "total_s": _since(start)}, "machine": machine,
            "precision": self.precision, "machine_class": self.machine_class,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }  # fmt: skip
        path = self.raw_dir / f"{cell_name(arm, seed)}.json"
        write_json_atomically(path, payload)
        print(f"wrote {path} in {payload['timings']['total_s']:.0f} s", flush=True)
        return path

    def evaluate(self, policy, seed: int | None) -> tuple[dict, dict]:
        """The offline benchmark (greedy) and, given the seed's SFT model, the held-out PPO prompt samples."""
        from srppo_trl.evaluation import evaluate_offline

        a = self.args
        policy.eval()
        result = evaluate_offline(
            policy, self.tokenizer, n_per_split=a.eval_n, n_arithmetic=a.eval_arithmetic, seed=0,
            max_new_tokens=a.eval_max_new_tokens, batch_size=a.eval_batch_size, per_prompt=True,
        )  # fmt: skip
        summary = dict(result["summary"])
        per_prompt = {
            f"{split}/{name}": values
            for split in ("in_domain", "held_out", "arithmetic")
            for name, values in result[split]["per_prompt"].items()
        }
        if seed is not None:  # the coherent reward and the KL are defined by the seed's SFT model
            reward = self.reward(seed)
            prompts = list(self.eval_prompts.select(range(a.sample_prompts))["prompt"])
            samples = sample_scores(policy, reward, self.tokenizer, prompts, a.sample_n, a.response_length, seed)
            per_prompt.update({f"samples/{k}": v for k, v in samples.items()})
            summary.update({f"samples/{k}": sum(v) / len(v) for k, v in samples.items()})
        return summary, per_prompt


def _since(start: float) -> float:
    return round(time.monotonic() - start, 1)


@torch.no_grad()
def sample_scores(policy, reward, tokenizer, prompts, num_samples, response_length, seed, chunk_prompts=8) -> dict:
    """Per prompt, the mean over `num_samples` responses sampled at temperature 1 (stopping at EOS, at most
    `response_length` tokens, as in training) of: the sequence-level coherent reward, the KL to the SFT model
    (sum over response tokens of log pi - log pi_SFT), the length in tokens and whether it ended at EOS."""
    from srppo_trl.data.tokenization import tokenize_prompt
    from srppo_trl.models.logprobs import sequence_logprobs
    from srppo_trl.trainer.rollout import response_mask_after_stop, rollout_generation_config, sample_responses

    torch.manual_seed(seed)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = rollout_generation_config(max_new_tokens=response_length, pad_token_id=pad, stop_token_id=eos)
    columns = {"coherent_reward": [], "kl_to_sft": [], "length": [], "eos_rate": []}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), chunk_prompts):
            ids = [tokenize_prompt(tokenizer, p) for p in prompts[start : start + chunk_prompts]]
            batch = tokenizer.pad({"input_ids": [i for i in ids for _ in range(num_samples)]}, return_tensors="pt")
            queries, query_mask = batch["input_ids"], batch["attention_mask"]
            responses = sample_responses(policy, queries, query_mask, config, len(queries), pad)
            response_mask, has_stop = response_mask_after_stop(responses, eos)
            input_ids = torch.cat([queries, responses], dim=1)
            attention = torch.cat([query_mask, response_mask], dim=1)
            scored = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)
            # The SFT pass serves the coherent reward and the KL (as `reward(...)` would, without running it twice).
            sft = reward.sft_log_probs(input_ids, attention, scored)
            coherent = (sft - reward.base_log_probs(input_ids, attention, scored)).sum(-1)
            kl = (sequence_logprobs(policy, input_ids, attention, scored) - sft).sum(-1)
            for name, value in (
                ("coherent_reward", coherent),
                ("kl_to_sft", kl),
                ("length", response_mask.sum(-1)),
                ("eos_rate", has_stop),
            ):
                columns[name] += value.float().view(-1, num_samples).mean(-1).tolist()
    finally:
        tokenizer.padding_side = padding_side
    return columns


# ---------------------------------------------------------------------------------------------- the report

COLUMNS = [
    ("held_out/inst_loose_acc", "held-out L.Acc"),
    ("held_out/inst_strict_acc", "held-out S.Acc"),
    ("in_domain/inst_loose_acc", "in-domain L.Acc"),
    ("in_domain/inst_strict_acc", "in-domain S.Acc"),
    ("arithmetic/exact_match", "arithmetic EM"),
    ("samples/coherent_reward", "sample coherent reward (nats)"),
    ("samples/kl_to_sft", "KL to SFT (nats)"),
    ("samples/length", "sample tokens"),
    ("samples/eos_rate", "sample EOS rate"),
]
TRUNCATION = [
    ("in_domain/truncated", "in-domain"),
    ("held_out/truncated", "held-out"),
    ("arithmetic/truncated", "arith"),
]
COMPARISONS = [("srppo", "sft"), ("srppo", "sft_extended"), ("srppo", "grpo"), ("srppo", "spin")]
HEADLINE = ("held_out/inst_loose_acc", "samples/coherent_reward")


def load_cells(raw_dir: Path) -> dict[str, dict]:
    """{arm: {seed: cell}} from the raw files alone."""
    cells: dict[str, dict] = {}
    for path in sorted(raw_dir.glob("*.json")):
        cell = json.loads(path.read_text())
        cells.setdefault(cell["arm"], {})[cell["seed"]] = cell
    return cells


def arm_interval(cells_by_seed: dict, metric: str, num_resamples: int = 2000):
    from srppo_trl.evaluation.sample_rewards import nested_bootstrap_ci

    groups = [
        c["per_prompt"][metric] for _, c in sorted(cells_by_seed.items(), key=_seed_key) if metric in c["per_prompt"]
    ]
    return nested_bootstrap_ci(groups, num_resamples=num_resamples) if groups else None


def paired_interval(a: dict, b: dict, metric: str, num_resamples: int = 2000):
    """a - b over the seeds both arms have, prompt by prompt within each seed."""
    from srppo_trl.evaluation.sample_rewards import nested_bootstrap_ci

    groups = []
    for seed in sorted(set(a) & set(b), key=lambda s: (s is None, s)):
        x, y = a[seed]["per_prompt"].get(metric), b[seed]["per_prompt"].get(metric)
        if x is None or y is None or len(x) != len(y):
            continue
        groups.append([p - q for p, q in zip(x, y)])
    return (nested_bootstrap_ci(groups, num_resamples=num_resamples), len(groups)) if groups else (None, 0)


def _seed_key(item):
    seed = item[0]
    return (seed is None, seed if seed is not None else 0)


def _fmt(ci, digits=3) -> str:
    if ci is None or math.isnan(ci[0]):
        return "-"
    mean, low, high = ci
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _signed(ci, digits=3) -> str:
    if ci is None:
        return "-"
    mean, low, high = ci
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _verdict(ci) -> str:
    if ci is None:
        return "not measured"
    return "higher" if ci[1] > 0 else "lower" if ci[2] < 0 else "not resolved: the interval holds 0"


def claim_verdict(cells: dict) -> list[str]:
    """The page's answer to the paper's claim, in sentences written from the intervals (once every cell is in): held-out
    instruction following against SFT (the claim itself), what longer SFT did, in-domain against SFT, and the two
    other baselines."""
    held, ind, reward = "held_out/inst_loose_acc", "in_domain/inst_loose_acc", "samples/coherent_reward"

    def diff(a, b, metric):
        ci, _ = paired_interval(cells[a], cells[b], metric) if a in cells and b in cells else (None, 0)
        return ci

    def said(ci, up="higher", down="lower"):
        if ci is None:
            return "not measured"
        word = up if ci[1] > 0 else down if ci[2] < 0 else "not resolved (the interval holds 0)"
        return f"{word}, {_signed(ci)}"

    main = diff("srppo", "sft", held)
    if main is None:
        return ["No verdict: the SRPPO and SFT cells have no held-out instruction scores to compare.", ""]
    if main[1] > 0:
        verdict, how = "The claim's central part holds", "better than SFT's"
    elif main[2] < 0:
        verdict, how = "The claim does not hold", "worse than SFT's"
    else:
        verdict, how = "The claim is not confirmed", "not distinguishable from SFT's"
    lines = [
        f"**{verdict} at this scale**: SRPPO's instruction following on held-out prompts (those the demonstrations "
        f"did not cover) is {how} (L.Acc {_signed(main)}).",
        "",
    ]
    lines.append(
        f"- Longer SFT (SFT (Extended) - SFT): held-out L.Acc {said(diff('sft_extended', 'sft', held))}; in-domain "
        f"L.Acc {said(diff('sft_extended', 'sft', ind))}. SRPPO against it: held-out "
        f"{said(diff('srppo', 'sft_extended', held))}; in-domain {said(diff('srppo', 'sft_extended', ind))}."
    )
    lines.append(f"- In-domain, SRPPO - SFT: L.Acc {said(diff('srppo', 'sft', ind))}.")
    for other in ("grpo", "spin"):
        lines.append(
            f"- SRPPO - {LABELS[other]}: held-out L.Acc {said(diff('srppo', other, held))}; sample coherent reward "
            f"{said(diff('srppo', other, reward))} nats."
        )
    return lines + [""]


def build_report(
    raw_dir: Path, png_name: str, seeds=(0, 1, 2), budget_check: Path | None = None, report_dir: Path = Path("docs")
) -> tuple[str, dict]:
    """The markdown page and the numbers behind it, from the raw cell files alone; `seeds`: the campaign's seeds
    (the page says how many of its cells are in)."""
    cells = load_cells(raw_dir)
    arms = [arm for arm in ARMS if arm in cells]
    intervals = {arm: {m: arm_interval(cells[arm], m) for m, _ in COLUMNS} for arm in arms}
    diffs = {
        (a, b): {m: paired_interval(cells[a], cells[b], m) for m, _ in COLUMNS}
        for a, b in COMPARISONS
        if a in cells and b in cells
    }
    lines = ["# A small-scale replication on SmolLM2-135M (CPU, offline)", ""]
    lines += [
        "Generated by `python scripts/small_replication.py --report` from the cell files in `docs/replication/raw/`"
        " (one per arm and training seed); do not edit by hand. How the cells are run: the script's docstring.",
        "",
        "The paper's claim: after SFT on demonstrations, PPO on the coherent reward (SRPPO) generalises better than "
        "SFT, most of all to prompts the demonstrations did not cover, without the losses longer SFT brings.",
        "",
        "## Conclusion",
        "",
    ]
    expected = [("base", None)] + [(arm, seed) for seed in seeds for arm in ARMS if arm != "base"]
    finished = sum(1 for arm, seed in expected if seed in cells.get(arm, {}))
    if not cells:
        lines += ["No cell has finished yet: there is nothing to conclude.", ""]
    elif finished < len(expected):
        lines += [
            f"**Incomplete: {finished} of {len(expected)} cells are in** (base once, 5 arms x {len(seeds)} seeds). "
            "The claim is not decided until every cell is in; the differences below, if any, use only the seeds "
            "that have both arms.",
            "",
        ]
    else:
        lines += claim_verdict(cells)
        lines += ["Every comparison, with both headline metrics:", ""]
    for (a, b), by_metric in diffs.items():
        parts = []
        for metric in HEADLINE:
            ci, n = by_metric[metric]
            name = dict(COLUMNS)[metric]
            parts.append(f"{name} {_signed(ci)} ({_verdict(ci)}; {n} seed{'s' if n != 1 else ''})")
        lines.append(f"- **{LABELS[a]} - {LABELS[b]}**: " + "; ".join(parts) + ".")
    lines += [
        "",
        "Intervals: 95% bootstrap, resampling the training seeds and, within each seed, the prompts (2000 resamples);"
        " a difference pairs the two arms' scores on the same prompt and seed.",
        "",
        "## Every arm",
        "",
        f"![every arm per metric, with 95% intervals](replication/{png_name})",
        "",
    ]
    header = "| arm | seeds | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines += [header, "|---|---:|" + "---:|" * len(COLUMNS)]
    for arm in arms:
        row = [_fmt(intervals[arm][m], 2 if m.startswith("samples/") else 3) for m, _ in COLUMNS]
        lines.append(f"| {LABELS[arm]} | {len(cells[arm])} | " + " | ".join(row) + " |")
    lines += ["", "Instruction accuracies are per prompt (the share of its instructions followed), then averaged. "
              "The base model has no sample columns: the coherent reward and the KL are defined by an SFT model.", ""]  # fmt: skip
    lines += ["## Paired differences", "", "| difference | " + " | ".join(n for _, n in COLUMNS) + " |"]
    lines.append("|---|" + "---:|" * len(COLUMNS))
    for (a, b), by_metric in diffs.items():
        row = [_signed(by_metric[m][0], 2 if m.startswith("samples/") else 3) for m, _ in COLUMNS]
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | " + " | ".join(row) + " |")
    lines += ["", "## Greedy truncation", "", "Share of greedy responses cut at the response budget before EOS.", ""]
    lines += ["| arm | " + " | ".join(n for _, n in TRUNCATION) + " |", "|---|" + "---:|" * len(TRUNCATION)]
    for arm in arms:
        row = []
        for metric, _ in TRUNCATION:
            values = [v for c in cells[arm].values() for v in c["per_prompt"].get(metric, [])]
            row.append(f"{sum(values) / len(values):.3f}" if values else "-")
        lines.append(f"| {LABELS[arm]} | " + " | ".join(row) + " |")
    lines += budget_check_section(budget_check, report_dir)
    lines += ["", "## Cost of each cell", ""]
    lines += [
        "GRPO's and SPIN's budget is their seed's SRPPO stage time, counted in CPU seconds of the process (all "
        "threads) or wall seconds as the cell says.",
        "",
    ]
    lines += ["| cell | train (min) | evaluation (min) | total (min) | RL stage wall / CPU (min) | budget (min) | "
              "stopped by budget | steps | load avg (1 min, start / end) | torch threads |",
              "|---|" + "---:|" * 9]  # fmt: skip
    for arm in arms:
        for seed, cell in sorted(cells[arm].items(), key=_seed_key):
            t, tr, m = cell["timings"], cell["training"], cell["machine"]
            stage = "-" if "stage_s" not in tr else f"{tr['stage_s'] / 60:.1f}"
            if "stage_cpu_s" in tr:
                stage += f" / {tr['stage_cpu_s'] / 60:.1f}"
            budget = f"{tr['budget_s'] / 60:.1f} {tr.get('budget_clock', 'wall')}" if "budget_s" in tr else "-"
            lines.append(
                f"| {cell_name(arm, seed)} | {t['train_s'] / 60:.1f} | {t['eval_s'] / 60:.1f} | "
                f"{t['total_s'] / 60:.1f} | {stage} | {budget} | "
                f"{_yes_no(tr.get('stopped_by_budget'))} | {tr.get('optimizer_steps', '-')} | "
                f"{m['load_avg_start'][0]:.2f} / {m.get('load_avg_end', [math.nan])[0]:.2f} | {m['torch_threads']} |"
            )
    lines += critic_section(cells.get("srppo", {}))
    total = sum(c["timings"]["total_s"] for by_seed in cells.values() for c in by_seed.values())
    lines += ["", f"All cells: {total / 3600:.2f} h.", "", "## Machine", ""]
    machines = {}
    for by_seed in cells.values():
        for cell in by_seed.values():
            m = cell["machine"]
            key = (m["cpu"], tuple(m["cpu_flags"]), m["cores_available"], m["torch"])
            machines.setdefault(key, []).append(cell_name(cell["arm"], cell["seed"]))
    for (cpu, flags, cores, version), names in machines.items():
        lines.append(
            f"- {cpu or 'unknown CPU'}, {cores} cores available, torch {version}, vector flags: "
            f"{', '.join(flags) or 'none listed'}: {len(names)} cell(s)"
        )
    lines += ["", "## Settings", ""]
    for arm in arms:
        config = next(iter(cells[arm].values()))["config"]
        shown = {k: v for k, v in config.items() if k not in ("arm", "seed")}
        lines.append(f"- {LABELS[arm]}: `{json.dumps(shown, sort_keys=True)}`")
    hashes = {json.dumps({k: c["config"].get(k) for k in OPTION_GROUPS["common"]}, sort_keys=True)
              for by_seed in cells.values() for c in by_seed.values()}  # fmt: skip
    if len(hashes) > 1:
        lines += ["", "**Warning: the cells were evaluated with different common settings** (see above)."]
    lines += [
        "",
        "## How to rerun",
        "",
        "```bash",
        "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python scripts/small_replication.py --max-minutes 110 --commit  # repeat",
        "python scripts/small_replication.py --report   # this page and its plot, from docs/replication/raw/ alone",
        "```",
        "",
        "Each run starts only the cells that fit in `--max-minutes` (by the longest finished cell of the same arm) and"
        " skips the cells whose file holds the same settings; a changed setting reruns only the cells it defines.",
    ]
    return "\n".join(lines) + "\n", {"intervals": intervals, "diffs": diffs, "cells": cells}


def budget_check_section(path: Path | None, report_dir: Path = Path("docs")) -> list[str]:
    """Whether a longer budget ends the truncated answers: the last JSON line of `benchmarks/bench_greedy_eval.py`."""
    if path is None or not Path(path).is_file():
        return ["", "Whether a longer budget would end the truncated answers was not measured for these models."]
    lines = [line for line in Path(path).read_text().splitlines() if line.startswith("{")]
    budget = json.loads(lines[-1])["budget"] if lines else {}
    if not budget:
        return ["", f"`{path}` holds no budget check."]
    cuts = sorted({int(c) for rates in budget.values() for c in rates})
    out = [
        "", f"Does a longer budget end them? Share of held-out answers still without EOS after each number of tokens, "
        f"greedy ([{Path(path).name}]({os.path.relpath(path, report_dir)}), `benchmarks/bench_greedy_eval.py --models ...`):",
        "", "| model | " + " | ".join(f"{c} tokens" for c in cuts) + " |", "|---|" + "---:|" * len(cuts),
    ]  # fmt: skip
    for name, rates in budget.items():
        out.append(
            f"| `{name}` | " + " | ".join(f"{rates[str(c)]:.3f}" if str(c) in rates else "-" for c in cuts) + " |"
        )
    return out


def critic_section(srppo_cells: dict) -> list[str]:
    """SRPPO's critic per seed: |return - value| and the mean return - value on the last warm-up buffer and the last
    buffer (a useful critic ends its warm-up with an error well below the returns' spread)."""
    if not srppo_cells:
        return []
    lines = ["", "## SRPPO's critic", "", "Per rollout buffer: the critic's mean |return - value|, the mean return - "
             "value, and the returns' spread (mean |return - mean return|: the error of the best constant critic), "
             "in the units of the trained returns (normalised scores when `normalize_reward` is on).", "",
             "| seed | warm-up buffers | actor buffers | last warm-up buffer: abs error / bias / spread | last buffer: "
             "abs error / bias / spread |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for seed, cell in sorted(srppo_cells.items(), key=_seed_key):
        buffers = [e for e in cell["training"].get("log_history", []) if "val/abs_error" in e]
        warmup = [e for e in buffers if e.get("critic_warmup")]
        actor = [e for e in buffers if not e.get("critic_warmup")]

        def pair(entries):
            if not entries:
                return "-"
            last = entries[-1]
            spread = last.get("val/returns_spread")
            return f"{last['val/abs_error']:.2f} / {last['val/bias']:+.2f} / " + (
                "-" if spread is None else f"{spread:.2f}"
            )

        lines.append(f"| {seed} | {len(warmup)} | {len(actor)} | {pair(warmup)} | {pair(buffers)} |")
    return lines


def _yes_no(value) -> str:
    return "-" if value is None else "yes" if value else "no"


def plot_report(numbers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    intervals = numbers["intervals"]
    arms = list(intervals)
    rows = math.ceil(len(COLUMNS) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.2 * rows), squeeze=False)
    for ax, (metric, name) in zip(axes.flat, COLUMNS):
        for x, arm in enumerate(arms):
            ci = intervals[arm][metric]
            if ci is None or math.isnan(ci[0]):
                continue
            mean, low, high = ci
            ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=3, color=f"C{x}")
        ax.set_xticks(range(len(arms)), [LABELS[a] for a in arms], rotation=60, fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args) -> None:
    if not Path(args.raw_dir).is_dir():
        raise SystemExit(f"error: --raw-dir {args.raw_dir} is not a folder: give the folder of the cell files.")
    png = Path(args.report_png)
    report_dir = Path(args.report_md).parent
    text, numbers = build_report(Path(args.raw_dir), png.name, args.seeds, Path(args.budget_check), report_dir)
    Path(args.report_md).write_text(text)
    plot_report(numbers, png)
    print(f"wrote {args.report_md} and {png}")


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        return write_report(args)
    raw_dir = Path(args.raw_dir)
    cells = grid_cells(args.arms, args.seeds)
    configs = {cell: cell_config(args, *cell) for cell in cells}

    def done(cell):
        return is_done(raw_dir, *cell, configs[cell])

    if all(done(cell) for cell in cells):
        print("Every cell is done with these settings; `--report` regenerates the page.")
        return {"ran": [], "skipped": cells, "stopped_before": None}
    campaign = Campaign(args)

    def run_cell(cell):
        path = campaign.run_cell(cell)
        if args.commit:
            commit_cell(path, f"Replication cell {cell_name(*cell)} (config {config_hash(configs[cell])})")

    def estimate_s(cell):  # its arm's longest finished cell, else the longest finished cell of any arm
        return longest_recorded_s(raw_dir, cell[0]) or longest_recorded_s(raw_dir, None)

    result = run_grid(cells, done, run_cell, args.max_minutes, estimate_s=estimate_s, blocked=campaign.blocked)
    print(f"ran {len(result['ran'])} cell(s), skipped {len(result['skipped'])} finished one(s)")
    return result


if __name__ == "__main__":
    main()
