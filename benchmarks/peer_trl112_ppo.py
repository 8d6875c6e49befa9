"""The peer of `bench_update.py`: TRL 1.12's `trl.experimental.ppo.PPOTrainer` on the same models and config, with
the coherent reward plugged in through a reward-model-shaped adapter. Runs in the TRL 1.12 venv only:

    bash benchmarks/setup_peer_env.sh                         # once: /work/.venv-trl112
    PYTHONPATH=src /work/.venv-trl112/bin/python benchmarks/peer_trl112_ppo.py --updates 3

(`bench_update.py` runs it for you.) Prints one JSON line: seconds per update, per phase, and peak RSS.

How TRL 1.12 PPO reads a reward model (`trl.experimental.utils.get_reward`): it runs
`getattr(model, model.base_model_prefix)(input_ids, attention_mask, position_ids, output_hidden_states=True)`, applies
`model.score` to `hidden_states[-1]` to get per-token scores [B, T, 1], and reads the score at the last non-pad
response token (the EOS of the truncated response). `CoherentRewardAdapter` satisfies exactly that: its "backbone"
returns, as the last hidden state, the running sum over response tokens of `log p_SFT(y_t) - log p_PT(y_t)` ([B, T, 1])
and `score` is the identity, so the score read at EOS is the coherent reward of the whole response. The backbone is
not told where the response starts, so the adapter holds `context_length`: this benchmark pads every batch to the same
prompt width (the same 8 prompts each update), checked at construction.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_common as bc  # noqa: E402

from srppo_trl.coherent_reward import CoherentRewardModel  # noqa: E402 - torch-only module


class _CumulativeCoherentReward(nn.Module):
    """The adapter's "backbone": hidden_states[-1] = cumulative coherent reward per token, [B, T, 1]."""

    def __init__(self, reward: CoherentRewardModel, context_length: int):
        super().__init__()
        self.reward = reward
        self.context_length = context_length
        self.timer = None

    def forward(self, input_ids, attention_mask, position_ids=None, **kwargs):
        response_mask = attention_mask.long().clone()
        response_mask[:, : self.context_length] = 0
        if self.timer is not None:
            with self.timer("score/sft (reward)"):
                sft = self.reward.sft_log_probs(input_ids, attention_mask.long(), response_mask)
            with self.timer("score/pt (reward)"):
                base = self.reward.base_log_probs(input_ids, attention_mask.long(), response_mask)
            ratios = sft - base
        else:
            ratios = self.reward.token_log_ratios(input_ids, attention_mask.long(), response_mask)
        running = ratios.cumsum(-1).unsqueeze(-1)
        return SimpleNamespace(hidden_states=(running,), last_hidden_state=running)


class CoherentRewardAdapter(nn.Module):
    """A reward model as TRL 1.12 PPO expects one (`base_model_prefix` backbone + `score` head) whose score at the
    EOS token equals the coherent reward `log p_SFT(y|x) - log p_PT(y|x)`."""

    base_model_prefix = "backbone"

    def __init__(self, sft_model, base_model, context_length: int):
        super().__init__()
        self.backbone = _CumulativeCoherentReward(CoherentRewardModel(sft_model, base_model), context_length)
        self.score = nn.Identity()
        self.config = sft_model.config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: PPOConfig(bf16=True)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    paths = bc.model_paths(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    tokenizer.padding_side = "left"
    prompts = bc.tokenized_prompts(tokenizer)
    context_length = max(len(p) for p in prompts)  # every batch holds all 8 prompts: always this width

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    sft, pt, policy = load(paths["sft"]), load(paths["pt"]), load(paths["sft"])
    value_model = AutoModelForSequenceClassification.from_pretrained(paths["sft"], num_labels=1, dtype=torch.float32)
    reward = CoherentRewardAdapter(sft, pt, context_length)
    timer = bc.Timer()
    reward.backbone.timer = timer

    with tempfile.TemporaryDirectory() as output_dir:
        config = PPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=bc.BATCH,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=bc.BATCH * (args.updates + 1),
            response_length=bc.RESPONSE_LENGTH,
            local_rollout_forward_batch_size=bc.BATCH,
            stop_token="eos",
            learning_rate=bc.LEARNING_RATE,
            kl_coef=bc.KL_COEF,
            vf_coef=bc.VF_COEF,
            report_to="none",
            save_strategy="no",
            bf16=args.precision == "bf16",
            use_cpu=not torch.cuda.is_available(),  # TrainingArguments refuses bf16 on a CPU without it
            seed=bc.SEED,
            num_sample_generations=0,
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=sft,  # the very SFT object inside the reward: TRL still runs it twice (ref + reward)
            reward_model=reward,
            value_model=value_model,
            train_dataset=Dataset.from_dict({"input_ids": prompts}),
        )
        rss_after_load = bc.peak_rss_mb()
        # Exactly RESPONSE_LENGTH new tokens (same work as ours and the floor); truncation at EOS still applies.
        trainer.policy_model.generation_config.eos_token_id = None

        # Phase timers, by wrapping the module-level functions the PPO loop calls.
        tokens = []
        original_generation = ppo_module.batch_generation

        def batch_generation(*a, **k):
            with timer("generation"):
                query_responses, logits = original_generation(*a, **k)
            tokens.append(query_responses.shape[0] * logits.shape[1])
            return query_responses, logits

        ppo_module.batch_generation = batch_generation
        original_forward = ppo_module.forward

        def forward(model, *a, **k):
            name = "score/sft (KL ref)" if not torch.is_grad_enabled() else "optimisation/policy+critic fwd"
            with timer(name):
                return original_forward(model, *a, **k)

        ppo_module.forward = forward
        original_get_reward = ppo_module.get_reward

        def get_reward(model, *a, **k):
            if model is reward:
                return original_get_reward(model, *a, **k)
            with timer("score/critic"):
                return original_get_reward(model, *a, **k)

        ppo_module.get_reward = get_reward
        original_backward = trainer.accelerator.backward

        def backward(loss, **k):
            with timer("optimisation/backward"):
                return original_backward(loss, **k)

        trainer.accelerator.backward = backward
        original_step = trainer.optimizer.step

        def step(*a, **k):
            with timer("optimisation/step"):
                return original_step(*a, **k)

        trainer.optimizer.step = step

        updates = []

        class StepTimer(TrainerCallback):
            start = None

            def on_train_begin(self, a, state, control, **kw):
                StepTimer.start = time.perf_counter()
                timer.reset()

            def on_step_end(self, a, state, control, **kw):
                phases = dict(timer.totals)
                phases["update"] = time.perf_counter() - StepTimer.start
                updates.append(phases)
                StepTimer.start = time.perf_counter()
                timer.reset()

        trainer.add_callback(StepTimer())
        trainer.train()

    timed = updates[1:]
    result = {key: [u.get(key, 0.0) for u in timed] for key in timed[0]}
    result["scoring"] = [sum(v for k, v in u.items() if k.startswith("score/")) for u in timed]
    result["optimisation"] = [sum(v for k, v in u.items() if k.startswith("optimisation/")) for u in timed]
    result["advantages"] = [u["update"] - u["generation"] - s - o for u, s, o in zip(timed, result["scoring"], result["optimisation"])]  # fmt: skip
    result["tokens"] = tokens[1:]
    result["peak_rss_mb"] = bc.peak_rss_mb()
    result["rss_after_load_mb"] = rss_after_load
    result["cuda_peak_mb"] = bc.cuda_peak_mb()
    result["trl"] = trl.__version__
    result["torch"] = torch.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
