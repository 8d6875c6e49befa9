"""Proof that the machinery learns: SRPPOTrainer vs TRL's GRPOTrainer and RLOOTrainer under one wall-clock budget.

    PYTHONPATH=src python benchmarks/learning.py                      # 2 rewards x 3 trainers x 20 min: ~3 h (est.)
    PYTHONPATH=src python benchmarks/learning.py --quick              # smoke run: 1 min per trainer, lighter settings
    PYTHONPATH=src python benchmarks/learning.py --reward coherent --sft-model outputs/learning/sft --budget-min 10
    PYTHONPATH=src python benchmarks/learning.py --report OUT_DIR a/results.json b/results.json   # merge runs

On SmolLM2-135M-Instruct (offline, CPU, fp32, `--threads` torch threads) each trainer gets the same training prompts
(the shipped demo PPO prompts), the same reward, the same start model, the same sampling (temperature 1, no top-k, no
top-p, `--max-new-tokens`) and the same wall-clock budget of *training* time (`--budget-min`), one after the other,
for two rewards:

- `scripted`: a verifiable reward the start model does not already maximise: 1 if the response contains the word
  `--word` (a whole word, any case) plus 0.2 if it ends with EOS within `--max-new-tokens` (a small term that keeps
  responses finished). Start model: SmolLM2-135M-Instruct itself. SRPPOTrainer takes it as a Python reward function
  (TRL's reward-function signature); GRPO/RLOO take the same function.
- `coherent`: SRPPO's coherent reward `log p_SFT(y|x) - log p_PT(y|x)`, p_SFT = the demo's SFT model (trained once with
  the demo YAML's SFT settings and cached in `<output-dir>/sft`, or `--sft-model DIR`), p_PT = SmolLM2. Start model:
  the SFT model. SRPPO gets `CoherentRewardModel(sft, pt)`, GRPO/RLOO `make_coherent_reward_func` of the same object.

Comparable settings (all overridable): 16 sampled responses per optimizer step (SRPPO: a rollout buffer of 16 prompts,
one mini batch; GRPO/RLOO: 4 prompts x 4 generations), one policy epoch per batch, one learning rate for every actor
(2e-5, constant schedule: 4x the demo's 5e-6, which barely moves the model in a few updates, see docs/replication.md;
no sweep) and for SRPPO's critic, the same KL coefficient 0.05 (SRPPO `kl_coef`, GRPO/RLOO `beta`; note GRPO puts it in
the loss as a per-token k3 term, RLOO and SRPPO as a reward penalty), no missing-EOS penalty, seed 0. SRPPO spends
its first `--critic-warmup` buffers training only the critic, inside its budget; `--normalize-reward` and
`--value-bias-init` turn on SRPPOConfig's `normalize_reward` and `value_bias_init` (off by default), e.g.

    PYTHONPATH=src python benchmarks/learning.py --reward coherent --lam 1 --cliprange-value none \
        --normalize-reward --value-bias-init --critic-warmup 8 --label "norm + bias init, warm-up 8"

Measured, for each (reward, trainer), by a `TrainerCallback` that also enforces the budget (it stops training at the
first optimizer step past it): every `--eval-every-s` seconds of training, on `--eval-prompts` held-out prompts, one
sampled response per prompt (temperature 1, the same seed every time) -> mean reward, and the KL to the start model
(mean over the responses of the summed per-token log pi - log pi_start, teacher-forced through both models), length
and EOS rate. Evaluation time is excluded from the budget clock; model loading and trainer set-up are outside it too.
Output: `<output-dir>/results.json` (rows of wall seconds, step, reward, KL per run), `learning.png` (reward and KL vs
wall-clock) and a markdown table (`results.md`, also printed). `--quick` writes under `<output-dir>/quick/`.

Cost: 2 h of training, plus ~6 evaluations per run (32 prompts: ~1-1.5 min each on 2 idle cores, estimated from
`--quick`), plus the SFT stage once (~8 min, README) and model set-up: about 3 h in all, not yet measured. `--quick`
on an idle 2-core VM: ~1.5 min per SmolLM2 step of 8 samples (one step per trainer), 13 s per 4-prompt evaluation.
On a loaded shared machine two torch threads were 3x slower than one (`--threads 1`).

Every trainer samples its rollouts from the full softmax at temperature 1 (SRPPOTrainer sets every sampling field
explicitly since the RL-correctness fixes; GRPO/RLOO get `top_k=0`, `top_p=1`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


TRAINERS = ("srppo", "grpo", "rloo")
REWARDS = ("scripted", "coherent")
DEMO_YAML = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "smollm2_demo.yaml"


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reward", choices=(*REWARDS, "both"), default="both")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of srppo,grpo,rloo")
    p.add_argument("--budget-min", type=float, default=None, help="training minutes per trainer (default 20; quick 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 min per trainer, 8 samples per step, 4 eval prompts, no critic warm-up, 4-step SFT",
    )
    p.add_argument("--base-model", default="smollm2", help="p_PT and scripted start model: 'smollm2' or a folder")
    p.add_argument("--sft-model", default=None, help="an SFT model folder (default: train and cache one)")
    p.add_argument("--output-dir", default="outputs/learning")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--word", default="great", help="the scripted reward's word (base rate ~5-8%% on SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="drop longer prompts (train and eval)")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--samples-per-step", type=int, default=None, help="responses per optimizer step (16; quick 8)")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO/RLOO group size")
    p.add_argument("--critic-warmup", type=int, default=None, help="SRPPO critic-only buffers (default 2; quick 0)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default 32; quick 4)")
    p.add_argument("--eval-every-s", type=float, default=None, help="training seconds between evals (default 240)")
    p.add_argument("--train-prompts", type=int, default=None, help="limit the training prompts (default: all)")
    p.add_argument("--sft-max-steps", type=int, default=None, help="SFT steps when training it (-1 demo; quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="training precision of every trainer (bf16: `bf16=True`, needs AVX-512 BF16/AMX on a CPU); "
        "evaluation runs in fp32 either way",
    )
    p.add_argument(
        "--fp32-attention-backward",
        choices=("auto", "off"),
        default="auto",
        help="SRPPO in bf16 on a CPU: the attention backward in fp32 on sequences under 192 tokens (auto: the "
        "trainer's default) or PyTorch's bf16 one (off: as bf16 runs trained before the trainer had it)",
    )
    p.add_argument(
        "--rollout-sampler",
        choices=("inverse_cdf", "multinomial"),
        default="inverse_cdf",
        help="SRPPO rollouts: how each token is drawn (`SRPPOConfig.rollout_sampler`; inverse_cdf: the trainer's "
        "default; multinomial: transformers' sampler, as SRPPO runs sampled before the trainer had its own)",
    )
    p.add_argument(
        "--cliprange-value",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=0.2,
        help="SRPPO's value clip ('none': no clip; SRPPOConfig/TRL 1.12 default 0.2, caps a value's move per buffer)",
    )
    p.add_argument(
        "--lam",
        type=float,
        default=None,
        help="SRPPO's GAE lambda (default: SRPPOConfig's, TRL 1.12's 0.95; paper 1.0)",
    )
    p.add_argument(
        "--normalize-reward",
        action="store_true",
        help="SRPPO: normalise the score by its running mean and std (SRPPOConfig.normalize_reward)",
    )
    p.add_argument(
        "--value-bias-init",
        action="store_true",
        help="SRPPO: start the critic head's bias at the first buffer's mean return (SRPPOConfig.value_bias_init)",
    )
    p.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --budget-min and --eval-every-s count: wall time (an idle machine) or this process's CPU time "
        "(equal compute when other jobs share the cores; with --threads 1 and the run pinned to one core, CPU seconds "
        "are the seconds it ran). The rows' `wall_s` is then CPU seconds",
    )
    p.add_argument(
        "--sft-only",
        action="store_true",
        help="train (or reuse) the SFT model in <output-dir>/sft and exit: the start model of later --sft-model runs",
    )
    p.add_argument(
        "--label", default=None, help="suffix of the trainers' names in the results, e.g. 'warm-up 0' (for --report)"
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        budget_min=1.0 if quick else 20.0,
        samples_per_step=8 if quick else 16,
        critic_warmup=0 if quick else 2,
        eval_prompts=4 if quick else 32,
        eval_every_s=30.0 if quick else 240.0,
        sft_max_steps=4 if quick else -1,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [t for t in args.trainers if t not in TRAINERS]
    if unknown or not args.trainers:
        p.error(f"--trainers must be a comma-separated subset of {','.join(TRAINERS)}, got {unknown or 'nothing'}")
    args.rewards = list(REWARDS) if args.reward == "both" else [args.reward]
    if args.samples_per_step % args.num_generations:
        p.error("--samples-per-step must be a multiple of --num-generations (GRPO/RLOO sample whole groups)")
    if quick:
        args.output_dir = str(Path(args.output_dir) / "quick")
    return args


def machine_info(threads: int) -> dict:
    import transformers
    import trl

    return {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
    }


# ---------------------------------------------------------------------------------------------- rewards


class KeywordReward:
    """TRL-style reward function: 1 if the completion contains `word` (whole word, any case), plus `eos_bonus` if it
    ends with EOS (the last completion id), i.e. finished within the token limit."""

    __name__ = "keyword_reward"

    def __init__(self, word: str, eos_token_id: int, eos_bonus: float = 0.2):
        self.word, self.eos_token_id, self.eos_bonus = word, eos_token_id, eos_bonus
        self.pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)

    def hit(self, completion) -> bool:
        if not isinstance(completion, str):  # conversational: [{"role": "assistant", "content": ...}]
            completion = " ".join(m["content"] for m in completion)
        return bool(self.pattern.search(completion))

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [
            float(self.hit(c)) + self.eos_bonus * float(bool(ids) and ids[-1] == self.eos_token_id)
            for c, ids in zip(completions, completion_ids)
        ]


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens: int, seed: int, batch_size: int = 16):
    """One response per chat prompt at temperature 1 (no top-k/top-p) -> (prompt ids, completion ids up to and
    including EOS) lists. Seeds torch with `seed` and restores the caller's RNG state afterwards."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    prompt_ids, completion_ids = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
                for p in prompts[start : start + batch_size]
            ]
            batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
            for row_prompt, row in zip(ids, out.tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != tokenizer.pad_token_id]
                prompt_ids.append(list(row_prompt))
                completion_ids.append(row)
    finally:
        torch.set_rng_state(rng)
    return prompt_ids, completion_ids


@torch.no_grad()
def kl_to_start(policy, start_model, tokenizer, prompt_ids, completion_ids, batch_size: int = 16) -> float:
    """Mean over responses of sum_t [log pi(y_t|x,y_<t) - log pi_start(y_t|x,y_<t)], teacher-forced through both."""
    from srppo_trl.models.logprobs import sequence_logprobs

    total, count = 0.0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompt_ids), batch_size):
        rows = list(zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]))
        width = max(len(p) + len(c) for p, c in rows)
        ids, attention, response = [], [], []
        for p, c in rows:
            left = width - len(p) - len(c)  # left-pad whole sequences: the response ends at the last column
            ids.append([pad] * left + p + c)
            attention.append([0] * left + [1] * (len(p) + len(c)))
            response.append([0] * (left + len(p)) + [1] * len(c))
        tensors = [torch.tensor(t) for t in (ids, attention, response)]
        diff = sequence_logprobs(policy, *tensors) - sequence_logprobs(start_model, *tensors)
        total += diff.sum().item()
        count += len(rows)
    return total / max(count, 1)


def evaluate(policy, start_model, tokenizer, reward_fn, prompts, max_new_tokens: int, seed: int) -> dict:
    """Held-out metrics of `policy`: mean reward, KL to the start model, response length, EOS rate (+ word rate)."""
    was_training = policy.training
    policy.eval()
    try:
        prompt_ids, completion_ids = sample_responses(policy, tokenizer, prompts, max_new_tokens, seed)
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        rewards = reward_fn(prompts=prompts, completions=completions, completion_ids=completion_ids)
        kl = kl_to_start(policy, start_model, tokenizer, prompt_ids, completion_ids)
    finally:
        policy.train(was_training)
    n = len(completion_ids)
    metrics = {
        "reward": sum(rewards) / n,
        "kl": kl,
        "length": sum(len(c) for c in completion_ids) / n,
        "eos_rate": sum(bool(c) and c[-1] == tokenizer.eos_token_id for c in completion_ids) / n,
    }
    if isinstance(reward_fn, KeywordReward):
        metrics["word_rate"] = sum(reward_fn.hit(c) for c in completions) / n
    metrics["example"] = completions[0][:200]
    return metrics


class WallClockBudget(TrainerCallback):
    """Stops training once `budget_s` seconds of training time are spent; evaluates every `eval_every_s` of them.

    `clock`: `time.perf_counter` (wall time: an idle machine) or `time.process_time` (this process's CPU time, all
    its threads: the same budget of compute when other jobs share the cores, e.g. one thread pinned per core).

    Training time is wall time since `on_train_begin` minus the time spent in this callback's evaluations. Rows:
    {"wall_s", "step", "reward", "kl", ...}; the first row is the start model (`start_row`, step 0).
    """

    def __init__(
        self, budget_s: float, eval_every_s: float, evaluate_fn, start_row: dict, label: str, clock=time.perf_counter
    ):
        self.budget_s, self.eval_every_s, self.evaluate_fn, self.label = budget_s, eval_every_s, evaluate_fn, label
        self.clock = clock
        self.rows = [{"wall_s": 0.0, "step": 0, **start_row}]
        self.critic_rows = []  # SRPPO only: the critic's error against the returns' spread, per logged step
        self.trainer = None
        self.start = None
        self.eval_s = 0.0
        self.next_eval = eval_every_s

    def train_seconds(self) -> float:
        return self.clock() - self.start - self.eval_s

    def _policy(self):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return getattr(model, "policy", model)  # SRPPO wraps policy and critic

    def _evaluate(self, step: int, train_s: float) -> None:
        began = self.clock()
        row = {"wall_s": round(train_s, 2), "step": step, **self.evaluate_fn(self._policy())}
        self.eval_s += self.clock() - began
        row["eval_s"] = round(self.clock() - began, 2)
        self.rows.append(row)
        print(
            f"[{self.label}] {train_s:7.1f} s  step {step:4d}  reward {row['reward']:8.3f}  KL {row['kl']:7.3f}  "
            f"len {row['length']:5.1f}  (eval {row['eval_s']:.1f} s)",
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        train_s = self.train_seconds()
        done = train_s >= self.budget_s
        if done or train_s >= self.next_eval:
            self._evaluate(state.global_step, train_s)
            while self.next_eval <= train_s:
                self.next_eval += self.eval_every_s
        if done:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "val/abs_error" in logs:
            keys = ("val/abs_error", "val/bias", "val/returns_spread", "critic_warmup")
            self.critic_rows.append({"step": state.global_step, **{k.split("/")[-1]: logs.get(k) for k in keys}})

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows[-1]["step"] != state.global_step:  # stopped by max_steps or the data, not the budget
            self._evaluate(state.global_step, self.train_seconds())
        self.train_s = self.train_seconds()


# ---------------------------------------------------------------------------------------------- models and trainers


def load_model(path: str):
    from srppo_trl.pipeline import load_causal_lm

    return load_causal_lm(path, {"dtype": torch.float32})


def frozen(model):
    model.requires_grad_(False)
    return model.eval()


def ensure_sft(args, base_path: str, tokenizer) -> str:
    """The demo's SFT stage (demo YAML's SFT settings) run once and cached in `<output-dir>/sft`."""
    import yaml
    from trl import ModelConfig

    from srppo_trl import SRPPOConfig
    from srppo_trl.pipeline import PipelineArguments, build_stage_data, run_sft

    cfg = yaml.safe_load(DEMO_YAML.read_text())
    pipe = PipelineArguments(
        setting="demo",
        dataset_seed=cfg["dataset_seed"],
        sft_learning_rate=cfg["sft_learning_rate"],
        sft_num_train_epochs=cfg["sft_num_train_epochs"],
        sft_per_device_train_batch_size=cfg["sft_per_device_train_batch_size"],
        sft_max_length=cfg["sft_max_length"],
        sft_max_steps=args.sft_max_steps,
    )
    # A real SRPPOConfig (run_sft reads the precision, device and logging fields of the pipeline's trainer config).
    run_args = SRPPOConfig(
        output_dir=args.output_dir, seed=cfg["seed"], report_to="none", logging_steps=10,
        activation_checkpointing=False,
    )  # fmt: skip
    stages, _, _ = build_stage_data(pipe)
    began = time.perf_counter()
    path = run_sft(pipe, run_args, ModelConfig(dtype="float32"), base_path, tokenizer, stages, None)
    print(f"SFT model: {path} ({time.perf_counter() - began:.0f} s, reused if it already existed)", flush=True)
    return path


def build_trainer(name: str, args, start_path: str, reward, reward_fn, ref_model, tokenizer, train_prompts, callback):
    """One trainer with the shared settings. `reward`: what SRPPO takes; `reward_fn`: the TRL callable."""
    common = dict(
        output_dir=str(Path(args.output_dir) / "runs" / name),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=1_000_000,  # the budget callback stops training
        temperature=1.0,
        seed=args.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        bf16=args.precision == "bf16",  # training passes only: evaluation always runs in fp32, the same for both
        use_cpu=not torch.cuda.is_available(),  # TrainingArguments refuses bf16 on a CPU unless this is set
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        gradient_checkpointing=False,  # every trainer without activation checkpointing (TRL configs default to it)
    )
    if name == "srppo":
        from srppo_trl import SRPPOConfig, SRPPOTrainer

        config = SRPPOConfig(
            **common,
            per_device_train_batch_size=args.samples_per_step,
            num_mini_batches=1,
            num_ppo_epochs=1,
            response_length=args.max_new_tokens,
            top_k=0,
            kl_coef=args.kl_coef,
            critic_learning_rate=args.learning_rate,
            critic_warmup_steps=args.critic_warmup,
            cliprange_value=args.cliprange_value,
            cpu_attention_fp32_backward=None if args.fp32_attention_backward == "auto" else False,
            rollout_sampler=args.rollout_sampler,
            **({} if args.lam is None else {"lam": args.lam}),
            normalize_reward=args.normalize_reward,
            value_bias_init=args.value_bias_init,
            missing_eos_penalty=None,
            stop_token="eos",  # responses end at EOS, as GRPO/RLOO's do (SRPPOConfig's TRL 1.12 default: no stop)
            local_rollout_forward_batch_size=args.samples_per_step,
        )
        return SRPPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=load_model(start_path),
            ref_model=ref_model,
            reward_model=reward,
            value_model=start_path,
            train_dataset=train_prompts,
            callbacks=[callback],
        )
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if name == "grpo" else (RLOOConfig, RLOOTrainer)
    config = config_cls(
        **common,
        per_device_train_batch_size=args.samples_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        top_k=0,
        top_p=1.0,
        beta=args.kl_coef,
        num_iterations=1,
        log_completions=False,
    )  # the reference model is loaded like the policy instance (fp32)
    return trainer_cls(
        model=load_model(start_path),
        reward_funcs=reward_fn,
        args=config,
        train_dataset=train_prompts,
        processing_class=tokenizer,
        callbacks=[callback],
    )


def load_prompts(args, tokenizer):
    """The demo PPO prompts of at most `max_prompt_tokens` tokens, shuffled with the demo's seed: the first
    `eval_prompts` held out, the rest for training."""
    from srppo_trl.data.demo import load_demo_prompts

    def short(example):
        ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return len(ids) <= args.max_prompt_tokens

    prompts = load_demo_prompts().filter(short).shuffle(seed=42)
    if len(prompts) <= args.eval_prompts:
        raise ValueError(f"Only {len(prompts)} demo prompts fit --max-prompt-tokens={args.max_prompt_tokens}.")
    eval_prompts = prompts.select(range(args.eval_prompts))["prompt"]
    train = prompts.select(range(args.eval_prompts, len(prompts)))
    if args.train_prompts:
        train = train.select(range(min(args.train_prompts, len(train))))
    return train, eval_prompts


# ---------------------------------------------------------------------------------------------- report


def critic_fit(run: dict) -> str:
    """SRPPO's critic on its last rollout buffer: `val/abs_error` / `val/returns_spread` (the error of the best
    constant), e.g. "3.1 / 4.0"; "-" for trainers without a critic or runs recorded before the spread was logged."""
    rows = [r for r in run.get("critic_rows", []) if r.get("returns_spread") is not None]
    return f"{rows[-1]['abs_error']:.2f} / {rows[-1]['returns_spread']:.2f}" if rows else "-"


def format_table(results: dict) -> str:
    lines = [
        "| reward | trainer | start reward | final reward | final KL | steps | train s | s / step | eval s "
        "| critic abs error / returns spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for reward, runs in results.items():
        for trainer, run in runs.items():
            first, last = run["rows"][0], run["rows"][-1]
            steps = run["steps"]
            per_step = run["train_s"] / steps if steps else float("nan")
            lines.append(
                f"| {reward} | {trainer} | {first['reward']:.3f} | {last['reward']:.3f} | {last['kl']:.3f} | {steps} "
                f"| {run['train_s']:.0f} | {per_step:.1f} | {run['eval_s']:.0f} | {critic_fit(run)} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(results)
    fig, axes = plt.subplots(2, len(rewards), figsize=(6 * len(rewards), 7), squeeze=False)
    for col, reward in enumerate(rewards):
        for trainer, run in results[reward].items():
            minutes = [r["wall_s"] / 60 for r in run["rows"]]
            axes[0][col].plot(minutes, [r["reward"] for r in run["rows"]], marker="o", label=trainer)
            axes[1][col].plot(minutes, [r["kl"] for r in run["rows"]], marker="o", label=trainer)
        axes[0][col].set_title(f"{reward} reward: held-out mean reward")
        axes[1][col].set_title(f"{reward} reward: KL to the start model (nats / response)")
        for row in (0, 1):
            axes[row][col].set_xlabel("training time (min, evaluation excluded; --budget-clock)")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def run_reward(kind: str, args, base_path: str, tokenizer, train_prompts, eval_prompts, save) -> dict:
    """All trainers on one reward: {"start_model", "start_eval_s", "runs": {trainer: {"rows", "steps", ...}}}.
    `save(partial)` is called after each trainer, so an interrupted run keeps what it measured."""
    from srppo_trl import CoherentRewardModel
    from srppo_trl.reward_funcs import make_coherent_reward_func

    if kind == "scripted":
        start_path = base_path
        start_model = frozen(load_model(start_path))
        reward_fn = KeywordReward(args.word, tokenizer.eos_token_id)
        srppo_reward, srppo_ref = reward_fn, start_model
    else:
        start_path = args.sft_model or ensure_sft(args, base_path, tokenizer)
        reward = CoherentRewardModel(load_model(start_path), load_model(base_path))
        start_model = reward.sft_model
        reward_fn = make_coherent_reward_func(reward, tokenizer)
        srppo_reward, srppo_ref = reward, None  # the reward's SFT model is SRPPO's KL reference
    print(f"\n=== {kind} reward, start model {start_path}", flush=True)

    def evaluate_fn(policy):
        return evaluate(policy, start_model, tokenizer, reward_fn, eval_prompts, args.max_new_tokens, args.seed + 1)

    began = time.perf_counter()
    start_row = evaluate_fn(start_model)
    start_eval_s = time.perf_counter() - began
    rate = f", word '{args.word}' in {start_row['word_rate']:.1%} of responses" if "word_rate" in start_row else ""
    print(
        f"start model on {len(eval_prompts)} held-out prompts: reward {start_row['reward']:.3f}{rate}, length "
        f"{start_row['length']:.1f}, EOS rate {start_row['eos_rate']:.2f} ({start_eval_s:.1f} s)",
        flush=True,
    )
    runs = {}
    partial = {"start_model": start_path, "start_eval_s": round(start_eval_s, 2), "runs": runs}
    for name in args.trainers:
        label = f"{kind}/{name}"
        clock = time.process_time if args.budget_clock == "cpu" else time.perf_counter
        callback = WallClockBudget(args.budget_min * 60, args.eval_every_s, evaluate_fn, start_row, label, clock)
        torch.manual_seed(args.seed)
        began = time.perf_counter()
        trainer = build_trainer(
            name, args, start_path, srppo_reward, reward_fn, srppo_ref, tokenizer, train_prompts, callback
        )
        setup_s = time.perf_counter() - began
        callback.trainer = trainer
        trainer.train()
        runs[name if args.label is None else f"{name} ({args.label})"] = {
            "rows": callback.rows,
            "critic_rows": callback.critic_rows,
            "steps": trainer.state.global_step,
            "train_s": round(callback.train_s, 2),
            "eval_s": round(callback.eval_s, 2),
            "setup_s": round(setup_s, 2),
        }
        print(f"[{label}] done: {trainer.state.global_step} steps in {callback.train_s:.0f} s of training", flush=True)
        save(partial)
        del trainer, callback
        gc.collect()
    return partial


def report(paths: list[str], output_dir: str) -> str:
    """Merge the `results.json` of several runs (e.g. one per reward, or an interrupted run, which keeps the trainers
    it finished) into one `results.md` and `learning.png` in `output_dir`; returns the table."""
    by_reward: dict = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        for kind, result in saved["rewards"].items():
            by_reward.setdefault(kind, {}).update(result["runs"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(by_reward)
    (out / "results.md").write_text(table + "\n")
    plot(by_reward, out / "learning.png")
    return table


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    from srppo_trl.pipeline import load_tokenizer, resolve_base_model

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base_model(args.base_model)
    tokenizer = load_tokenizer(base_path)
    if args.sft_only:
        return {"sft_model": ensure_sft(args, base_path, tokenizer)}
    train_prompts, eval_prompts = load_prompts(args, tokenizer)
    settings = {k: v for k, v in vars(args).items()}
    print(f"settings: {json.dumps(settings)}", flush=True)

    began = time.perf_counter()
    results = {"machine": info, "settings": settings, "rewards": {}}

    def save(partial):
        results["rewards"][kind] = partial
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))

    for kind in args.rewards:
        run_reward(kind, args, base_path, tokenizer, train_prompts, eval_prompts, save)
    results["total_s"] = round(time.perf_counter() - began, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    by_reward = {kind: r["runs"] for kind, r in results["rewards"].items()}
    table = format_table(by_reward)
    (output_dir / "results.md").write_text(table + "\n")
    plot(by_reward, output_dir / "learning.png")
    print(f"\n{table}\n\nWrote {output_dir / 'results.json'}, results.md, learning.png ({results['total_s']} s)")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        # python benchmarks/learning.py --report OUT_DIR results.json [results.json ...]
        print(report(sys.argv[3:], sys.argv[2]))
    else:
        main()
