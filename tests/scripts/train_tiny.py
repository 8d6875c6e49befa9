"""Train a tiny SRPPO model to completion and save it; used by tests/test_distributed.py and
tests/test_crash_safe_resume.py (which kills it and resumes it with `--resume`).

    accelerate launch --num_processes 2 --cpu tests/scripts/train_tiny.py OUTPUT_DIR [--critic_warmup_steps N]
        [--max_steps N] [--save_steps N] [--num_ppo_epochs N] [--resume]

Shrunk on purpose (tiny models from srppo_trl.testing, 8 prompts, 6-token responses, 4 optimizer steps) so that two
CPU processes (gloo) finish in well under a minute. Every process builds identical models from the same seeds.
"""

import argparse

import torch
from datasets import Dataset
from transformers import TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer import last_complete_checkpoint


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
        max_steps=cli.max_steps,
        save_strategy="steps",
        save_steps=cli.save_steps,
        report_to="none",
        seed=0,
        use_cpu=True,
        # Defaults of SRPPOConfig before it took TRL 1.12 PPOConfig's (issue 14), pinned so this test is unchanged.
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
    resume = cli.resume and last_complete_checkpoint(cli.output_dir) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(cli.output_dir + "/final")
    if trainer.accelerator.is_main_process:
        print(f"world_size={trainer.accelerator.num_processes} global_step={trainer.state.global_step}")


if __name__ == "__main__":
    main()
