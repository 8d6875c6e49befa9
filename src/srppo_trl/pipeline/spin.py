"""SPIN (Chen et al. 2024, "Self-Play Fine-Tuning"): the paper's demonstrations-only baseline, on TRL's DPOTrainer.

    opponent_0 = the SFT model
    for t = 1 .. T:
        y'_i ~ opponent_{t-1}(. | x_i)                  for every demonstration (x_i, y_i)   (batched, sampled)
        pairs_t = {(x_i, chosen = y_i, rejected = y'_i)}  minus the pairs where y'_i == y_i  (dropped, counted)
        opponent_t = DPO(policy = opponent_{t-1}, reference = opponent_{t-1}, pairs_t)

SPIN's loss is DPO's sigmoid loss with the opponent as reference (the SPIN authors' `spin_loss` with
`loss_type="sigmoid"`), so TRL's `DPOTrainer` trains each iteration as is; nothing here computes a loss.

Layout under `output_dir` (every iteration resumable):

    iter-<t>/pairs.jsonl        the pairs of iteration t (written once, atomically: a restart never regenerates them)
    iter-<t>/generation.json    counts: demonstrations, pairs, dropped (response equal to the demonstration)
    iter-<t>/checkpoint-<step>  DPOTrainer checkpoints (`save_strategy`): a crash resumes from the last one
    iter-<t>/model              opponent_t, full weights (a LoRA adapter is merged): the next iteration's start
    iter-<t>/iteration.json     the iteration's record, written last: the iteration is done
    spin.json                   one record per iteration

Where we differ from the SPIN repository (see docs/spin.md): the rejected response is generated from the very token
ids DPOTrainer later trains on (our chat template, with the BOS the tokenizer adds to text), and every sampling field
is set explicitly, so nothing is inherited from the checkpoint's `generation_config.json`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
GENERATION_FILE = "generation.json"
MODEL_DIR = "model"
RECORD_FILE = "iteration.json"
SUMMARY_FILE = "spin.json"


@dataclass
class SPINGenerationConfig:
    """How the opponent samples its (rejected) responses. Every field that changes the sampling distribution is set
    (`srppo_trl.trainer.rollout.rollout_generation_config` sets the rest to neutral values): nothing comes from the
    checkpoint's `generation_config.json`. Defaults: the SPIN repository's `generate_vllm.py` (temperature 1,
    top-p 1, no top-k, 256 new tokens)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k (vLLM's default, which the SPIN authors sampled with)
    batch_size: int = 16  # prompts per `generate` call
    seed: int = 42  # iteration t samples with seed + t

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SPIN's max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise ValueError(f"SPIN's generation temperature must be positive, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SPIN's generation top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.batch_size < 1:
            raise ValueError(
                f"SPIN's generation top_k must be >= 0 and batch_size >= 1, got {self.top_k} and {self.batch_size}."
            )


@dataclass
class SPINIteration:
    """What one iteration did (one entry of `spin.json`)."""

    iteration: int
    opponent: str  # the model that generated the rejected responses and served as DPO's reference
    model: str  # this iteration's result, the next opponent
    demonstrations: int
    pairs: int
    dropped_equal: int  # generated response == demonstration: no preference to learn, left out
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- input checks


def check_spin_inputs(demonstrations, iterations: int) -> None:
    """Raise `ValueError` (one sentence) unless SPIN can run: `iterations >= 1` and at least one usable
    demonstration (a conversation in `messages` ending with the assistant turn SPIN takes as the chosen response)."""
    from ..data.builders import check_sft_data

    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"SPIN needs spin_iterations >= 1 (the number of self-play rounds), got {iterations!r}.")
    if demonstrations is None or len(demonstrations) == 0:
        raise ValueError(
            "SPIN needs demonstrations (prompt + the assistant's response) to build its pairs, but the SFT data is "
            "empty: give a setting or data source with at least one conversation."
        )
    check_sft_data(demonstrations, "SPIN demonstrations")


def demonstration_examples(demonstrations):
    """`messages` -> columns `prompt` (every turn before the last, as chat messages) and `demonstration` (the last
    assistant turn's text). Multi-turn conversations keep their earlier turns in the prompt."""

    def split(example):
        messages = example["messages"]
        return {"prompt": messages[:-1], "demonstration": messages[-1]["content"]}

    return demonstrations.map(split, remove_columns=demonstrations.column_names)


# ---------------------------------------------------------------------------------------------- opponent generation


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_responses(model: nn.Module, tokenizer, prompts: list, generation: SPINGenerationConfig, seed: int):
    """Sample one response per prompt (chat messages) from `model`: the response texts, without special tokens.

    Each prompt is tokenized exactly as DPOTrainer will tokenize it (`tokenize_prompt`: the chat template with the
    generation prompt, led by the BOS the tokenizer adds to text). Prompts go to `generate` `generation.batch_size`
    at a time, sorted by length so that little padding is computed; responses end at the first EOS.
    """
    from ..data.tokenization import tokenize_prompt
    from ..trainer.rollout import response_mask_after_stop, rollout_generation_config, sample_responses

    if not prompts:
        return []
    config = rollout_generation_config(
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        top_k=generation.top_k,
        top_p=generation.top_p,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_id=tokenizer.eos_token_id,
    )
    token_ids = [tokenize_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    texts: list[str | None] = [None] * len(prompts)
    next_report, report_every = 0, max(1, len(order) // 10)  # about ten progress lines per generation
    for start in range(0, len(order), generation.batch_size):
        if start >= next_report:
            logger.info("SPIN generation: %d / %d prompts done.", start, len(order))
            next_report = start + report_every
        chunk = order[start : start + generation.batch_size]
        ids, mask = _left_pad([token_ids[i] for i in chunk], tokenizer.pad_token_id)
        responses = sample_responses(
            model, ids.to(device), mask.to(device), config, len(chunk), tokenizer.pad_token_id
        ).cpu()
        keep, _ = response_mask_after_stop(responses, tokenizer.eos_token_id)
        for row, index in enumerate(chunk):
            tokens = responses[row][keep[row].bool()].tolist()
            texts[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return texts


def generate_sharded(model, tokenizer, prompts: list, generation: SPINGenerationConfig, seed: int) -> list[str]:
    """`generate_responses` with the prompts split over the processes (every process gets every response back)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return generate_responses(model, tokenizer, prompts, generation, seed)
    indices = list(range(state.process_index, len(prompts), state.num_processes))
    mine = generate_responses(model, tokenizer, [prompts[i] for i in indices], generation, seed + state.process_index)
    gathered = gather_object(list(zip(indices, mine)))
    texts = [None] * len(prompts)
    for index, text in gathered:
        texts[index] = text
    return texts


def build_spin_pairs(examples, responses: list[str]):
    """DPO pairs in TRL's conversational preference format: `prompt` (messages), `chosen` = [the demonstration],
    `rejected` = [the opponent's response], as assistant messages. DPOTrainer applies the chat template once to
    prompt + chosen and prompt + rejected. A response equal to its demonstration (after stripping whitespace) is
    no preference: that pair is dropped. Returns (pairs `Dataset`, number dropped)."""
    from datasets import Dataset

    if len(responses) != len(examples):
        raise ValueError(f"Got {len(responses)} responses for {len(examples)} demonstrations: one each is needed.")
    rows, dropped = [], 0
    for example, response in zip(examples, responses):
        if response.strip() == example["demonstration"].strip():
            dropped += 1
            continue
        rows.append(
            {
                "prompt": example["prompt"],
                "chosen": [{"role": "assistant", "content": example["demonstration"]}],
                "rejected": [{"role": "assistant", "content": response}],
            }
        )
    return Dataset.from_list(rows), dropped


# ---------------------------------------------------------------------------------------------- DPO


def build_dpo_trainer(
    opponent: str, model_kwargs: dict, dpo_values: dict, output_dir: Path, tokenizer, pairs, peft_config, callbacks
):
    """TRL's DPOTrainer for one iteration: policy and reference both loaded from the opponent's folder (with LoRA,
    the reference is the opponent itself: the policy's base with the adapter off)."""
    import copy

    from trl import DPOConfig, DPOTrainer

    from .run import load_causal_lm

    args = DPOConfig(output_dir=str(output_dir), **dpo_values)
    policy = load_causal_lm(opponent, model_kwargs)
    reference = None if peft_config is not None else load_causal_lm(opponent, model_kwargs)
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),  # PEFT writes the base model's path into the config it is given
        callbacks=callbacks,
    )


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").exists() and (
        (folder / "model.safetensors").exists() or any(folder.glob("model-*.safetensors"))
    )


def _write_json_atomically(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _load_pairs(path: Path):
    from datasets import Dataset

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return Dataset.from_list(rows)


def _iteration_pairs(iteration, opponent, examples, tokenizer, generation, model_kwargs, folder: Path):
    """The pairs of one iteration: read back from `folder` when an earlier run wrote them, else generated by the
    opponent and written (by the main process; the others wait and read them)."""
    from accelerate import PartialState

    from .run import load_causal_lm

    pairs_file, counts_file = folder / PAIRS_FILE, folder / GENERATION_FILE
    state = PartialState()
    if not pairs_file.exists():
        model = load_causal_lm(opponent, model_kwargs)
        if "quantization_config" not in model_kwargs:
            model.to(state.device)
        responses = generate_sharded(
            model, tokenizer, list(examples["prompt"]), generation, generation.seed + iteration
        )
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the generation copy of the opponent leaves room for DPO's policy and reference
        pairs, dropped = build_spin_pairs(examples, responses)
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(row) + "\n" for row in pairs)
            counts = {"demonstrations": len(examples), "pairs": len(pairs), "dropped_equal": dropped}
            _write_json_atomically(counts_file, counts)
            _write_json_atomically(pairs_file, lines)  # last: its presence means the iteration's data is complete
        state.wait_for_everyone()
    counts = json.loads(counts_file.read_text())
    logger.info(
        "SPIN iteration %d: %d pairs from %d demonstrations; %d dropped (the response equals the demonstration).",
        iteration, counts["pairs"], counts["demonstrations"], counts["dropped_equal"],
    )  # fmt: skip
    if counts["pairs"] == 0:
        raise ValueError(
            f"SPIN iteration {iteration} has no pairs: the opponent reproduced all {counts['demonstrations']} "
            "demonstrations exactly, so there is nothing left to prefer (SPIN has converged on this data)."
        )
    return _load_pairs(pairs_file), counts


def run_spin(
    sft_model: str,
    demonstrations,
    tokenizer,
    output_dir: str | Path,
    *,
    iterations: int,
    dpo_values: dict,
    generation: SPINGenerationConfig | None = None,
    model_kwargs: dict | None = None,
    peft_config=None,
    callbacks=None,
) -> list[SPINIteration]:
    """SPIN from the SFT model: `iterations` rounds of (generate with the opponent, DPO against it).

    Args:
        sft_model: folder of the SFT model (opponent 0).
        demonstrations: a `Dataset` with `messages` (the SFT data: prompt turns + the assistant's demonstration).
        tokenizer: the tokenizer with its chat template (DPOTrainer's processing class and the generation's).
        output_dir: see the module docstring. A finished iteration (its `model/` exists) is skipped; an unfinished
            one reuses its pairs and resumes from its last DPOTrainer checkpoint.
        dpo_values: DPOConfig fields except `output_dir` (beta, loss_type, learning rate, epochs, saving, ...).
        generation: the opponent's sampling settings.
        model_kwargs: `from_pretrained` keyword arguments (dtype, attention, 4-bit quantisation).
        peft_config: a PEFT config: each iteration trains a fresh LoRA adapter on the opponent and merges it.
        callbacks: `TrainerCallback`s for every iteration's DPOTrainer.

    Returns one `SPINIteration` per iteration (also written to `<output_dir>/spin.json`).
    """
    from ..data.tokenization import ensure_chat_template_bos
    from ..trainer.checkpointing import last_complete_checkpoint, trainer_checkpoint_problem
    from .run import save_sft_model

    check_spin_inputs(demonstrations, iterations)
    generation = generation or SPINGenerationConfig()
    model_kwargs = dict(model_kwargs or {})
    ensure_chat_template_bos(tokenizer)  # generation and DPOTrainer then render the same BOS-led prompt
    examples = demonstration_examples(demonstrations)
    output_dir = Path(output_dir)
    records, opponent = [], str(sft_model)
    for iteration in range(1, iterations + 1):
        folder = output_dir / f"iter-{iteration}"
        model_dir = folder / MODEL_DIR
        if _is_saved_model(model_dir) and (folder / RECORD_FILE).exists():
            logger.info("SPIN iteration %d already done in %s: reusing it.", iteration, model_dir)
            records.append(SPINIteration(**json.loads((folder / RECORD_FILE).read_text())))
            opponent = str(model_dir)
            continue
        pairs, counts = _iteration_pairs(iteration, opponent, examples, tokenizer, generation, model_kwargs, folder)
        trainer = build_dpo_trainer(
            opponent, model_kwargs, dpo_values, folder, tokenizer, pairs, peft_config, callbacks
        )
        # The last *complete* DPOTrainer checkpoint: a kill while saving leaves a folder that transformers'
        # `get_last_checkpoint` would still pick (weights without trainer_state.json restart the schedule on them).
        checkpoint = last_complete_checkpoint(folder, problem=trainer_checkpoint_problem)
        if checkpoint is not None:
            logger.info("SPIN iteration %d resumes from %s.", iteration, checkpoint)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        save_sft_model(trainer, tokenizer, model_dir, merge_peft=peft_config is not None)
        logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
        metrics = {"train_loss": result.training_loss, **({k: logged[-1][k] for k in logged[-1]} if logged else {})}
        records.append(SPINIteration(iteration, opponent, str(model_dir), metrics=metrics, **counts))
        if _is_main_process():
            _write_json_atomically(folder / RECORD_FILE, asdict(records[-1]))
        opponent = str(model_dir)
        del trainer
    if _is_main_process():
        _write_json_atomically(output_dir / SUMMARY_FILE, [asdict(r) for r in records])
    return records


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


__all__ = [
    "SPINGenerationConfig",
    "SPINIteration",
    "build_dpo_trainer",
    "build_spin_pairs",
    "check_spin_inputs",
    "demonstration_examples",
    "generate_responses",
    "run_spin",
]


# ---------------------------------------------------------------------------------------------- pipeline stage


def build_spin_dpo_values(pipe, srppo_args) -> dict:
    """DPOConfig fields (all but `output_dir`) for `algorithm: spin`, from the recipe.

    Like `pipeline.build_group_config`: every field DPOConfig shares with `SRPPOConfig` carries over by name (all of
    `TrainingArguments`: learning rate and schedule, batch sizes, epochs/max_steps per iteration, precision,
    logging, saving, seed, ...); `pipe.spin_trainer_extra` sets DPOConfig's own fields (`beta`, `loss_type`,
    `max_length`, ...) and overrides the others. Unknown names are refused.
    """

    from trl import DPOConfig

    from .run import apply_extra_fields, shared_config_values

    values, names = shared_config_values(srppo_args, DPOConfig, exclude=("output_dir", "model_init_kwargs"))
    return apply_extra_fields(values, names, pipe.spin_trainer_extra, "spin_trainer_extra", "DPOConfig")


def spin_generation_config(pipe, seed: int) -> SPINGenerationConfig:
    """The `spin_generation_*` fields of the recipe."""
    return SPINGenerationConfig(
        max_new_tokens=pipe.spin_generation_max_new_tokens,
        temperature=pipe.spin_generation_temperature,
        top_p=pipe.spin_generation_top_p,
        top_k=pipe.spin_generation_top_k,
        batch_size=pipe.spin_generation_batch_size,
        seed=seed,
    )


def check_spin_stage(pipe, srppo_args, stages) -> None:
    """Everything `algorithm: spin` can check before SFT: the iterations, the demonstrations, the sampling settings,
    the DPOConfig it will build, and no vLLM."""
    from datasets import concatenate_datasets
    from trl import DPOConfig

    if srppo_args.use_vllm:
        raise ValueError(
            "algorithm: spin generates with transformers' `generate`, not vLLM: set use_vllm: false for SPIN."
        )
    demonstrations = concatenate_datasets([d.select_columns(["messages"]) for _, d in stages]) if stages else None
    check_spin_inputs(demonstrations, pipe.spin_iterations)
    spin_generation_config(pipe, srppo_args.seed)
    DPOConfig(output_dir=srppo_args.output_dir, **build_spin_dpo_values(pipe, srppo_args))


def run_spin_stage(pipe, srppo_args, model_args, sft_path, tokenizer, stages, peft_config) -> dict:
    """Stage 2 of the pipeline with `algorithm: spin`: SPIN on the demonstrations of every SFT stage, from the SFT
    model, in `<output_dir>/spin`. Returns the pipeline's result entries (the final model, the iterations, and with
    `offline_eval_n > 0` the offline benchmark of SFT and SPIN)."""
    from accelerate import PartialState
    from datasets import concatenate_datasets

    from .run import load_causal_lm, model_init_kwargs, offline_scores

    demonstrations = concatenate_datasets([d.select_columns(["messages"]) for _, d in stages])
    output_dir = Path(srppo_args.output_dir)
    kwargs = model_init_kwargs(model_args)
    records = run_spin(
        sft_path,
        demonstrations,
        tokenizer,
        output_dir,
        iterations=pipe.spin_iterations,
        dpo_values=build_spin_dpo_values(pipe, srppo_args),
        generation=spin_generation_config(pipe, srppo_args.seed),
        model_kwargs=kwargs,
        peft_config=peft_config,
    )
    result = {"spin_model": records[-1].model, "spin_iterations": [asdict(r) for r in records], "results": {}}
    if pipe.offline_eval_n > 0 and _is_main_process():
        rows = {}
        for name, path in (("SFT", sft_path), ("SPIN", records[-1].model)):
            model = load_causal_lm(path, kwargs)
            if "quantization_config" not in kwargs:
                model.to(PartialState().device)
            rows[name] = offline_scores(model, tokenizer, pipe.offline_eval_n)
            del model
        result["results"] = rows
    return result
