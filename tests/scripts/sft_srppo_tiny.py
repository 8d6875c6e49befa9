"""SFT -> SRPPO on tiny models, with a checkpoint, a resume from it and a final `save_model`; for
tests/trainer/test_sharded_engines.py, under `accelerate launch` with a DDP, FSDP or DeepSpeed config.

    accelerate launch --config_file CONFIG tests/scripts/sft_srppo_tiny.py OUTPUT_DIR

Writes, under OUTPUT_DIR:
    sft/                  the SFT model (pipeline.save_sft_model: Trainer.save_model, gathered, main process)
    run/checkpoint-{2,4}  SRPPO checkpoints (one every rollout buffer)
    run/final             `save_model` of the uninterrupted SRPPO run (policy + critic in value_model/)
    resumed/final         `save_model` of a second SRPPO run resumed from run/checkpoint-2

Every process builds the same tiny models from the same seeds. Gradient clipping is off (a huge `max_grad_norm`):
DDP clips the actor and the critic apart, DeepSpeed and FSDP jointly, and the test compares the engines' weights.
The actor and the critic have different learning rates, so a lost `srppo_role` split shows in the weights.
"""

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.pipeline.run import leave_process_group, save_sft_model
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
# Without CUDA, `use_cpu=False` leaves accelerate with no backend: every process would train alone. DeepSpeed needs
# `use_cpu=False` (accelerate turns it off on `cpu`) and gets its gloo state from `accelerator_state`.
USE_CPU = not DEEPSPEED and not torch.cuda.is_available()


def accelerator_state() -> dict:
    """TrainingArguments kwargs for the process state. Under DeepSpeed without CUDA, accelerate's PartialState finds no
    backend and counts 1 process while DeepSpeed's group has 2 (DeepSpeed then refuses the batch sizes): `main` sets
    the state up with gloo, and each trainer uses it (with a fresh AcceleratorState for its own DeepSpeed config)."""
    if not DEEPSPEED:
        return {}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return {"accelerator_config": {"use_configured_state": True}}


def sft(out: Path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(8)],
            "completion": [[{"role": "assistant", "content": f"The answer is {2 * i}."}] for i in range(8)],
        }
    )
    args = SFTConfig(
        output_dir=str(out / "sft-run"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        max_length=64,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=0,
        use_cpu=USE_CPU,
        bf16=False,  # fp32: compared with the DDP run to fp32 tolerance
        **accelerator_state(),
        dataloader_num_workers=0,
    )
    # Loaded from its folder after the config exists, as `pipeline.run_sft` does: under ZeRO-3 (zero3_init_flag)
    # `from_pretrained` then partitions the weights as it loads them.
    trainer = SFTTrainer(model=str(out / "base"), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    save_sft_model(trainer, tokenizer, out / "sft")


def srppo(out: Path, output_dir: Path, tokenizer, max_steps: int, resume: str | None = None):
    prompts = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(8)]}
    )
    args = SRPPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,  # x 2 processes: mini batches of 4 prompts
        num_mini_batches=1,
        num_ppo_epochs=2,  # 2 optimizer steps per rollout buffer
        response_length=6,
        # SGD with momentum: a linear update, so the engines' weights agree to float32 rounding (Adam's division by
        # sqrt(v) + eps blows the rounding of near-zero gradients up to a fraction of the learning rate), with an
        # optimizer state to resume.
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=0.05,
        critic_learning_rate=0.15,
        max_grad_norm=1e9,
        critic_warmup_steps=1,  # the first buffer trains the critic only: the actor's lr is 0 there
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        seed=0,
        use_cpu=USE_CPU,
        bf16=False,  # fp32: compared with the DDP run to fp32 tolerance
        **accelerator_state(),
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
    )
    sft_path = str(out / "sft")
    # As `pipeline.run_rl` loads them: every model from its folder, the critic from the SFT folder.
    reward = CoherentRewardModel(
        AutoModelForCausalLM.from_pretrained(sft_path), AutoModelForCausalLM.from_pretrained(str(out / "base"))
    )
    torch.manual_seed(3)  # the critic's fresh value head
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(sft_path),
        reward_model=reward,
        value_model=sft_path,
        train_dataset=prompts,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir / "final"))
    return trainer


def critic_copy_difference(out: Path, tokenizer) -> float:
    """Build the trainer with `value_model=None` from an in-memory SFT model loaded after the config (under ZeRO-3:
    partitioned), and return the largest difference between the critic's backbone and the SFT file's weights."""
    from safetensors.torch import load_file

    from srppo_trl.models.modeling import _gathered

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {i}."}] for i in range(8)]})
    args = SRPPOConfig(
        output_dir=str(out / "critic-copy"),
        per_device_train_batch_size=2,
        response_length=6,
        report_to="none",
        use_cpu=USE_CPU,
        bf16=False,
        **accelerator_state(),
        max_steps=2,
        num_sample_generations=0,
    )
    sft_path = str(out / "sft")
    reward = CoherentRewardModel(
        AutoModelForCausalLM.from_pretrained(sft_path), AutoModelForCausalLM.from_pretrained(str(out / "base"))
    )
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(sft_path),  # an object: the critic copies its weights
        reward_model=reward,
        value_model=None,
        train_dataset=prompts,
    )
    critic = trainer.model.value_model
    saved = load_file(out / "sft" / "model.safetensors")
    prefix = critic.base_model_prefix + "."
    with _gathered(critic):
        state = {k: v.detach().clone() for k, v in critic.state_dict().items() if k.startswith(prefix)}
    assert state and set(state) <= set(saved), sorted(set(state) - set(saved))[:3]
    return max((state[k].float() - saved[k].float()).abs().max().item() for k in state)


def adam_after_warmup(out: Path, tokenizer) -> tuple[list[int], str]:
    """`--adam_after_warmup`: SRPPO with AdamW, one critic warm-up buffer of 2 optimizer steps, then one actor step;
    returns the step counts held in the actor's Adam state on this process (1: the actor's first update was a fresh
    Adam step, whatever the warm-up's zero gradients did to its state) and the class of the optimizer holding it."""
    from srppo_trl.trainer.ppo_step import _optimizer_chain, _params_holding_state

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {i}."}] for i in range(8)]})
    args = SRPPOConfig(
        output_dir=str(out / "adam-run"),
        per_device_train_batch_size=2,
        num_ppo_epochs=2,
        response_length=6,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        critic_warmup_steps=1,
        max_steps=3,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=USE_CPU,
        bf16=False,
        **accelerator_state(),
        activation_checkpointing=False,
        num_sample_generations=0,
    )
    base = str(out / "base")
    reward = CoherentRewardModel(
        AutoModelForCausalLM.from_pretrained(str(out / "policy_init")), AutoModelForCausalLM.from_pretrained(base)
    )
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(str(out / "policy_init")),
        reward_model=reward,
        value_model=str(out / "policy_init"),
        train_dataset=prompts,
    )
    trainer.train()
    chain = _optimizer_chain(trainer.optimizer)
    states = chain[-1].state
    steps = {
        int(states[param]["step"])
        for group, param in _params_holding_state(chain)
        if group.get("srppo_role") == "actor" and param in states
    }
    return sorted(steps), type(chain[-1]).__name__


def prepare(out: Path) -> None:
    """The pretrained model (and an initial policy for `--adam_after_warmup`), in one process before the launch (the
    launched processes only read them)."""
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=2).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(out / "policy_init")


def force_fsdp_on_cpu() -> None:
    """`SRPPO_FORCE_FSDP_ON_CPU=1`: an experiment, not a supported mode (docs/troubleshooting.md). accelerate 1.15 turns
    FSDP on only for GPU-like distributed types, so on CPU it silently runs DDP; this patch makes its state report
    FSDP with the launch config's plugin on a gloo `MULTI_CPU` group, so that accelerate shards with FSDP2 (which
    torch runs on CPU: tests/scripts/fsdp2_cpu_probe.py)."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--prepare", action="store_true", help="only write OUTPUT_DIR/base (run it once, unlaunched)")
    parser.add_argument(
        "--adam_after_warmup", action="store_true", help="only the AdamW run: print the actor's Adam step counts"
    )
    cli = parser.parse_args()
    if cli.prepare:
        return prepare(Path(cli.output_dir))
    torch.set_num_threads(1)
    if os.environ.get("SRPPO_FORCE_FSDP_ON_CPU") == "1":
        force_fsdp_on_cpu()
    if DEEPSPEED:
        from accelerate import PartialState

        PartialState(backend="gloo")
    out = Path(cli.output_dir)
    tokenizer = tiny_tokenizer()
    if cli.adam_after_warmup:
        steps, optimizer = adam_after_warmup(out, tokenizer)
        deepspeed, rank = os.environ.get("ACCELERATE_USE_DEEPSPEED"), os.environ.get("RANK")
        print(f"engine={deepspeed} rank={rank} optimizer={optimizer} actor_adam_steps={steps}", flush=True)
        leave_process_group()
        return
    sft(out, tokenizer)
    copy_difference = critic_copy_difference(out, tokenizer)
    trainer = srppo(out, out / "run", tokenizer, cli.max_steps)
    groups = [(g.get("srppo_role"), g.get("initial_lr"), len(g["params"])) for g in trainer.optimizer.param_groups]
    resumed = srppo(out, out / "resumed", tokenizer, cli.max_steps, resume=str(out / "run" / "checkpoint-2"))
    if trainer.accelerator.is_main_process:
        print(f"engine={trainer.accelerator.distributed_type} world_size={trainer.accelerator.num_processes}")
        print(f"param_groups={groups}")
        print(f"critic_copy_max_difference={copy_difference}")
        print(f"global_step={trainer.state.global_step} resumed_global_step={resumed.state.global_step}")
    leave_process_group()


if __name__ == "__main__":
    main()
