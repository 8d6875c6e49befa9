"""Train a tiny SRPPO model to completion and save it; used by tests/test_distributed.py and
tests/test_crash_safe_resume.py (which kills it and resumes it with `--resume`).

    accelerate launch --num_processes 2 --cpu tests/scripts/train_tiny.py OUTPUT_DIR [--critic_warmup_steps N]
        [--normalize_reward] [--value_bias_init] [--max_steps N] [--save_steps N] [--num_ppo_epochs N] [--resume]

With `--normalize_reward` every process also writes its running reward moments, the moments of every score of every
buffer (gathered from all processes) and its critic head's bias, in `OUTPUT_DIR/report_rank<N>.json`.

Shrunk on purpose (tiny models from srppo_trl.testing, 8 prompts, 6-token responses, 4 optimizer steps) so that two
CPU processes (gloo) finish in well under a minute. Every process builds identical models from the same seeds.
"""

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.pipeline.run import leave_process_group
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer.srppo_trainer import last_complete_checkpoint


class AnnounceTraining(TrainerCallback):
    """Prints a line when training begins (models built, checkpoint loaded), after each step and when training ends:
    a test can time kills by them."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"training from step {state.global_step}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):  # before the Trainer saves the step's checkpoint
        if state.is_world_process_zero:
            print(f"finished step {state.global_step}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"training ended at step {state.global_step}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--critic_warmup_steps", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--normalize_reward", action="store_true")
    parser.add_argument("--value_bias_init", action="store_true")
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--num_ppo_epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="resume from the last complete checkpoint, if any")
    cli = parser.parse_args()

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    prompts = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(8)]}
    )
    args = SRPPOConfig(
        output_dir=cli.output_dir,
        per_device_train_batch_size=2,  # x 2 processes: a mini batch of 4 prompts
        num_mini_batches=1,
        num_ppo_epochs=cli.num_ppo_epochs,  # optimizer steps per rollout buffer (default 2)
        response_length=6,
        learning_rate=1e-3,
        critic_warmup_steps=cli.critic_warmup_steps,
        normalize_reward=cli.normalize_reward,
        value_bias_init=cli.value_bias_init,
        max_steps=cli.max_steps,
        save_strategy="steps",
        save_steps=cli.save_steps,
        report_to="none",
        seed=0,
        use_cpu=True,
        # Defaults of SRPPOConfig before it took TRL 1.12 PPOConfig's, pinned so this test is unchanged.
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
    )
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    torch.manual_seed(3)
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward,
        train_dataset=prompts,
        callbacks=[AnnounceTraining()],
    )
    scores = []
    if cli.normalize_reward:
        make_buffer = trainer.make_rollout_buffer

        def gather_scores(batch):
            buffer = make_buffer(batch)
            scores.append(trainer.accelerator.gather(buffer.scores.double()))
            return buffer

        trainer.make_rollout_buffer = gather_scores
    resume = cli.resume and last_complete_checkpoint(cli.output_dir) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(cli.output_dir + "/final")
    if cli.normalize_reward:
        everything = torch.cat(scores)
        expected = [len(everything), everything.mean().item(), ((everything - everything.mean()) ** 2).sum().item()]
        bias = trainer.model.value_model.score.bias.item()
        rank = trainer.accelerator.process_index
        report = {"rank": rank, "moments": trainer._reward_moments.tolist(), "expected": expected, "bias": bias}
        # One file per process: two processes printing at once can interleave their lines.
        (Path(cli.output_dir) / f"report_rank{rank}.json").write_text(json.dumps(report))
    if trainer.accelerator.is_main_process:
        print(f"world_size={trainer.accelerator.num_processes} global_step={trainer.state.global_step}")
    leave_process_group()


if __name__ == "__main__":
    main()
