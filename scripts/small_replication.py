"""A small-scale replication of the paper's comparison on SmolLM2-135M-Instruct, offline, on CPU.

Arms:

    base            SmolLM2-135M-Instruct as shipped (p_PT)
    sft             SFT on the shipped demonstrations (`--sft-epochs`)
    sft_extended    the SFT model trained `--extended-epochs` more epochs (the paper's "SFT (Extended)")
    srppo_sequence  SRPPO from the SFT model, coherent reward at EOS (the paper's default), once per `--seeds`
    srppo_token     SRPPO with the token-level reward (Appendix E: watch the response length), once per `--seeds`

The base, SFT and SFT (Extended) arms run once (`--sft-seed`; greedy evaluation is deterministic): on 2 CPU cores an
SFT epoch over the ~300 demonstrations takes ~8 minutes, so the seeds vary the RL stage only (rollout sampling,
prompt order, critic head initialisation). The spread reported is over those seeds.

Every arm is scored with the offline benchmark (in-domain and held-out instruction following, arithmetic exact match;
greedy) and, for the RL arms, with the coherent reward / length / EOS rate of samples on held-out PPO prompts.
Writes `<output>/replication.json` and `<output>/replication.md` (mean and spread over seeds).

    python scripts/small_replication.py --output outputs/replication --seeds 0 1  # ~82 min on 2 CPU cores

Measured (docs/replication.md): SFT 2 epochs 17 min, SFT (Extended) 4 more epochs 33 min, each RL arm ~7 min with its
evaluation. `--reuse-sft outputs/replication` reruns only the RL arms (other `--actor-lr`, seeds, ...) on the SFT
models of that earlier run (measured 32 min for 2 seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="outputs/replication")
    parser.add_argument("--base-model", default="smollm2", help="'smollm2' (offline) or a local model folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sft-seed", type=int, default=42, help="seed of the SFT and SFT (Extended) runs")
    parser.add_argument("--sft-epochs", type=float, default=2, help="the paper's SFT: 2 epochs")
    parser.add_argument("--sft-max-steps", type=int, default=-1, help="SFT steps per run (-1: by epochs)")
    parser.add_argument(
        "--extended-epochs", type=float, default=4, help="extra epochs on top of --sft-epochs (paper: 6 in total)"
    )
    parser.add_argument("--sft-lr", type=float, default=5e-5)
    parser.add_argument(
        "--reuse-sft",
        default=None,
        help="an earlier run's --output: take its SFT and SFT (Extended) models instead of training them again "
        "(to rerun the RL arms with other settings)",
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="PPO prompts (one pass)")
    parser.add_argument("--rollout-batch", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--actor-lr", type=float, default=5e-6)
    parser.add_argument("--reward-clip", type=float, default=None, help="None: no clip (see docs/recipes.md)")
    parser.add_argument("--critic-lr", type=float, default=1e-5)
    parser.add_argument("--critic-warmup", type=int, default=2)
    parser.add_argument("--kl-coef", type=float, default=0.2)
    parser.add_argument("--eval-n", type=int, default=16, help="offline benchmark prompts per split")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out PPO prompts for reward/length")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def offline(model, tokenizer, n):
    from srppo_trl.evaluation import evaluate_offline

    return evaluate_offline(model, tokenizer, n_per_split=n, seed=0, max_new_tokens=96)["summary"]


def main(argv=None):
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from srppo_trl import SRPPOConfig
    from srppo_trl.pipeline import (
        PipelineArguments,
        build_stage_data,
        load_tokenizer,
        resolve_base_model,
        run_rl,
        run_sft,
    )

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sft_path, ext_path = _reused(Path(args.reuse_sft)) if args.reuse_sft else (None, None)  # checked before loading
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    base_path = resolve_base_model(args.base_model)
    tokenizer = load_tokenizer(base_path)
    model_args = ModelConfig(dtype="float32")
    rows: dict[str, list[dict]] = {}
    timings = {}

    t = time.time()
    base = AutoModelForCausalLM.from_pretrained(base_path)
    rows["base"] = [offline(base, tokenizer, args.eval_n)]
    timings["base_eval_s"] = round(time.time() - t, 1)
    del base

    # SFT and SFT (Extended) once, with --sft-seed: on 2 CPU cores they are most of the cost (see the module doc).
    pipe = PipelineArguments(
        base_model=base_path, setting="demo", num_prompts=args.num_prompts, eval_num_prompts=args.eval_prompts,
        dataset_seed=42, sft_learning_rate=args.sft_lr, sft_num_train_epochs=args.sft_epochs,
        sft_per_device_train_batch_size=8, sft_max_length=256, sft_max_steps=args.sft_max_steps,
    )  # fmt: skip
    stages, prompts, eval_prompts = build_stage_data(pipe)
    # activation_checkpointing=False: SRPPOConfig's default before it took TRL 1.12's (on), kept for the timings.
    sft_args = SRPPOConfig(
        output_dir=str(out / "sft"), seed=args.sft_seed, report_to="none", logging_steps=5,
        activation_checkpointing=False,
    )  # fmt: skip
    t = time.time()
    sft_path = sft_path or run_sft(pipe, sft_args, model_args, base_path, tokenizer, stages, None)
    timings["sft_s"] = round(time.time() - t, 1)
    rows["sft"] = [offline(AutoModelForCausalLM.from_pretrained(sft_path), tokenizer, args.eval_n)]

    t = time.time()
    extended = copy.copy(pipe)
    extended.sft_num_train_epochs = args.extended_epochs
    ext_args = SRPPOConfig(
        output_dir=str(out / "sft_extended"), seed=args.sft_seed, report_to="none", logging_steps=5,
        activation_checkpointing=False,
    )  # fmt: skip
    ext_path = ext_path or run_sft(extended, ext_args, model_args, sft_path, tokenizer, stages, None)
    timings["sft_extended_s"] = round(time.time() - t, 1)
    rows["sft_extended"] = [offline(AutoModelForCausalLM.from_pretrained(ext_path), tokenizer, args.eval_n)]

    for seed in args.seeds:
        for granularity in ("sequence", "token"):
            t = time.time()
            rl_args = SRPPOConfig(
                output_dir=str(out / f"seed{seed}" / f"srppo_{granularity}"), seed=seed, report_to="none",
                save_strategy="no", per_device_train_batch_size=args.rollout_batch, num_mini_batches=1,
                num_ppo_epochs=1, num_train_epochs=1, response_length=args.response_length,
                max_prompt_length=args.max_prompt_length, learning_rate=args.actor_lr, critic_learning_rate=args.critic_lr,
                critic_warmup_steps=args.critic_warmup, kl_coef=args.kl_coef, reward_clip=args.reward_clip,
                missing_eos_penalty=1.0, reward_granularity=granularity, logging_steps=1,
                local_rollout_forward_batch_size=8, per_device_eval_batch_size=16,
                temperature=1.0, stop_token="eos", activation_checkpointing=False, num_sample_generations=0,
            )  # fmt: skip
            trainer, before, after = run_rl(
                pipe, rl_args, model_args, sft_path, base_path, tokenizer, prompts, eval_prompts, None
            )
            policy = trainer.accelerator.unwrap_model(trainer.model).policy
            scores = offline(policy, tokenizer, args.eval_n)
            scores.update({f"samples/{k.removeprefix('eval_')}": v for k, v in after.items()})
            rows.setdefault(f"srppo_{granularity}", []).append(scores)
            if granularity == "sequence":  # the SFT samples: same seed, same prompts for both granularities
                rows.setdefault("sft_samples", []).append(
                    {f"samples/{k.removeprefix('eval_')}": v for k, v in before.items()}
                )
            timings[f"seed{seed}_srppo_{granularity}_s"] = round(time.time() - t, 1)
            log_path = out / f"seed{seed}" / f"srppo_{granularity}_log.json"
            log_path.write_text(json.dumps(trainer.state.log_history, indent=1))
            del trainer, policy

    summary = {arm: _aggregate(values) for arm, values in rows.items()}
    result = {
        "args": vars(args), "wall_time_s": round(time.time() - start, 1), "timings": timings,
        "threads": torch.get_num_threads(), "per_seed": rows, "summary": summary,
    }  # fmt: skip
    (out / "replication.json").write_text(json.dumps(result, indent=2))
    (out / "replication.md").write_text(_table(summary) + "\n")
    print(_table(summary))
    print(f"\nwall time {result['wall_time_s']} s; wrote {out / 'replication.json'} and {out / 'replication.md'}")


def _reused(previous: Path) -> tuple[str, str]:
    """The SFT and SFT (Extended) model folders an earlier run of this script wrote under `previous`."""
    paths = (previous / "sft" / "sft", previous / "sft_extended" / "sft")
    for path in paths:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--reuse-sft {previous}: no model in {path}; pass the --output folder of a finished run of this script."
            )
    return str(paths[0]), str(paths[1])


def _aggregate(values: list[dict]) -> dict:
    keys = sorted({k for v in values for k in v})
    agg = {}
    for key in keys:
        xs = [v[key] for v in values if key in v and v[key] is not None]
        if xs:
            agg[key] = {
                "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "n": len(xs),
            }
    return agg


COLUMNS = [
    ("in_domain/inst_strict_acc", "in-domain S.Acc"),
    ("in_domain/inst_loose_acc", "in-domain L.Acc"),
    ("held_out/inst_strict_acc", "held-out S.Acc"),
    ("held_out/inst_loose_acc", "held-out L.Acc"),
    ("arithmetic/exact_match", "arith EM"),
    ("held_out/mean_response_words", "held-out words"),
    ("samples/objective/coherent_reward", "sample coherent reward"),
    ("samples/completions/mean_length", "sample tokens"),
    ("samples/completions/eos_rate", "sample EOS rate"),
]


def _table(summary: dict) -> str:
    lines = ["| arm | " + " | ".join(name for _, name in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for arm, metrics in summary.items():
        cells = []
        for key, _ in COLUMNS:
            m = metrics.get(key)
            cells.append(
                "-" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}" if m["n"] > 1 else f"{m['mean']:.3f}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
