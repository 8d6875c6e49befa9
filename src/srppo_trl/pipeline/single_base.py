"""Single-base mode in the pipeline (`single_base: true`): SFT -> SRPPO on one copy of the base weights.

    stage 1  TRL's SFTTrainer trains a LoRA adapter on the base (QLoRA with `load_in_4bit`) -> `<output_dir>/sft`
             holds the adapter only (a later SFT stage trains the same adapter further)
    stage 2  the base is loaded once and `build_single_base` puts the SFT adapter ("sft", frozen: the reward's p_SFT
             and the KL reference), the policy adapter ("default") and the critic adapter ("critic") on it; p_PT is
             the base with the adapters off. No merge and no second copy of the base weights.
    saving   the policy adapter at the root of `<output_dir>/srppo` (`PeftModel.from_pretrained(base, folder)`), the
             SFT and critic adapters in its `sft/` and `critic/`; checkpoints hold adapters and the value head only.

What does not combine is refused before anything loads, with one sentence: another `algorithm` than ppo (TRL's
GRPO/RLOO trainers would take the base with adapters off as their reference), a preference `reward_model` (the KL
reference of single-base mode is the coherent reward's SFT adapter), DeepSpeed ZeRO-3 and FSDP (they shard the one
base that every role shares; not supported), and a `sft_model` folder that holds no LoRA adapter. Without `use_peft`
the pipeline turns it on with ModelConfig's LoRA fields (`lora_r` 16, `lora_alpha` 32, PEFT's default target modules
of the architecture unless `lora_target_modules` is given): single-base mode is LoRA by definition.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn


logger = logging.getLogger(__name__)


def check_single_base_arguments(pipe) -> None:
    """The checks of `PipelineArguments` alone (run in its `__post_init__`)."""
    if not pipe.single_base:
        if pipe.critic_top_layers is not None:
            raise ValueError(
                "critic_top_layers is a single-base option (the critic's LoRA on its top layers): set single_base "
                "true, or leave critic_top_layers unset."
            )
        return
    if pipe.algorithm != "ppo":
        raise ValueError(
            f"single_base supports algorithm ppo only, got {pipe.algorithm!r}: TRL's GRPO/RLOO/DPO (SPIN) trainers "
            "would take the base with its adapters off (p_PT) as their reference; set single_base false for them."
        )
    if pipe.reward_model is not None:
        raise ValueError(
            "single_base needs the coherent reward (its SFT adapter is also the KL reference): drop reward_model, or "
            "set single_base false for the preference-reward-model baseline."
        )


def sharded_training(srppo_args) -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when this run shards the model weights across processes, else None: from the
    arguments' DeepSpeed plugin (`--deepspeed`) and FSDP fields, or the environment `accelerate launch` sets."""
    env = os.environ
    plugin = getattr(srppo_args, "deepspeed_plugin", None)
    if getattr(plugin, "zero_stage", None) == 3 or (
        env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
        and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    ):
        return "DeepSpeed ZeRO-3"
    if getattr(srppo_args, "fsdp", None) or env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    return None


def check_single_base_run(pipe, srppo_args, model_args) -> None:
    """The checks that need the other configs, before anything loads; turns `use_peft` on where it is off."""
    if not pipe.single_base:
        return
    sharded = sharded_training(srppo_args)
    if sharded is not None:
        raise ValueError(
            f"single_base is not supported under {sharded}: it would shard the one base that the policy, critic, "
            "SFT and pretrained models share; run on one GPU, or set single_base false for sharded training."
        )
    if pipe.sft_model is not None and os.path.isdir(pipe.sft_model) and not sft_adapter_done(Path(pipe.sft_model)):
        raise ValueError(
            f"single_base needs sft_model to be a LoRA adapter folder (adapter_config.json and "
            f"adapter_model.safetensors), but {pipe.sft_model} holds none: pass the adapter of a single-base SFT run "
            "(its <output_dir>/sft), or set single_base false to use full SFT weights."
        )
    if not model_args.use_peft:
        logger.info(
            "single_base: training LoRA adapters (use_peft turned on; lora_r=%s, lora_alpha=%s, target modules %s).",
            model_args.lora_r,
            model_args.lora_alpha,
            model_args.lora_target_modules or "PEFT's default for the architecture",
        )
        model_args.use_peft = True


def sft_adapter_done(folder: Path) -> bool:
    """True when `folder` holds a whole saved LoRA adapter (a finished single-base SFT stage): its
    `adapter_config.json` parses and its safetensors file holds every byte its header announces (a crash mid-save
    leaves a stage to retrain, not to reuse)."""
    from ..trainer.checkpointing import saved_adapter_problem

    return saved_adapter_problem(folder) is None


def load_single_base_sft_stage(current: str, base_path: str, model_args, peft_config):
    """(model, peft_config) for one SFT stage: the base and `peft_config` for the first stage (SFTTrainer adds the
    adapter), the base with the previous stage's adapter, trainable, and no config for a later one."""
    from .run import load_causal_lm, model_init_kwargs

    base = load_causal_lm(base_path, model_init_kwargs(model_args), getattr(model_args, "model_revision", None))
    if current == base_path:
        return base, peft_config
    from peft import PeftModel

    return PeftModel.from_pretrained(base, current, is_trainable=True), None


def build_single_base_models(pipe, srppo_args, sft_path: str, base_path: str, kwargs: dict, revision=None):
    """(policy, reward_model, value_model) of stage 2 on one load of the base (see `build_single_base`)."""
    from ..models.single_base import build_single_base
    from .run import load_causal_lm

    base = load_causal_lm(base_path, kwargs, revision)
    policy, reward, critic = build_single_base(base, sft_adapter=sft_path, critic_top_layers=pipe.critic_top_layers)
    if srppo_args.fp16:
        trainable_in_fp32(policy, critic)
    return policy, reward, critic


def trainable_in_fp32(*modules: nn.Module) -> None:
    """Cast every trainable parameter held in fp16 to fp32 (here: the value head of an fp16 base).

    fp16 mixed precision (a GPU without bf16, e.g. a T4) scales the loss and unscales the gradients before the
    optimizer step, which PyTorch's GradScaler refuses for fp16 gradients; PEFT already makes LoRA weights fp32.
    """
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()


__all__ = [
    "build_single_base_models",
    "check_single_base_arguments",
    "check_single_base_run",
    "load_single_base_sft_stage",
    "sft_adapter_done",
    "sharded_training",
    "trainable_in_fp32",
]
