"""Saving, crash safety and exact resume of `SRPPOTrainer`.

Checkpoints hold the policy (full weights or adapter) at the root, loadable with `from_pretrained`, and the critic in
`value_model/`, all in safetensors, plus the Trainer's optimizer/scheduler/RNG state. Saves go through a temporary
folder renamed into place; `resume_from_checkpoint=True` picks the last *complete* checkpoint; a non-finite value
stops training after saving the last good state.

The `Trainer` methods this changes (`train`, `_save_checkpoint`, `_save_rng_state`, `_save`, `_load_from_checkpoint`)
are overridden in `SRPPOTrainer` itself; they call the helpers here: `CheckpointMixin`'s methods (a part of
`SRPPOTrainer`), `checkpoint_to_resume`, `unmark_complete` and `load_saved_models`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn


logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"
# The trainer's own state beyond the Trainer's (JSON: floats round-trip exactly), in every checkpoint.
EXTRA_STATE_FILE = "srppo_trainer_state.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


class CheckpointMixin:
    """`SRPPOTrainer`'s saving and resuming helpers; the `Trainer` methods they serve are overridden in
    `SRPPOTrainer` (`train`, `_save_checkpoint`, `_save_rng_state`, `_save`, `_load_from_checkpoint`)."""

    def _save_last_good_state(self) -> str:
        """Checkpoint the current weights, optimizer, scheduler and RNG states through the Trainer's machinery.

        Called when a non-finite value stops training: it is raised before any backward pass of the current micro-step
        and before the optimizer step, so the weights are still those of the last good optimizer step. An existing
        complete checkpoint of this step is kept as it is.
        """
        checkpoint = self._checkpoint_folder(trial=None)
        exists = _is_complete_checkpoint(Path(checkpoint))
        self.accelerator.wait_for_everyone()
        if not exists:
            self.model.zero_grad(set_to_none=True)
            self._save_checkpoint(self.model, trial=None)
        return checkpoint

    def _checkpoint_folder(self, trial) -> str:
        """The folder `Trainer._save_checkpoint` writes this step's checkpoint into."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _write_saved_model(self, output_dir: str, state_dict=None) -> None:
        """Write the policy (or its adapter), the critic (checkpoints, or `save_value_model`), the tokenizer, the config
        and, in a checkpoint, the trainer's extra state into a temporary folder, then move it into `output_dir`.

        `state_dict`, when given, is the wrapper's gathered state dict: it is what gets written, split into the policy's
        (`policy.*`) and the critic's (`value_model.*`) weights.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        target = Path(output_dir).resolve()
        is_checkpoint = target.name.startswith("checkpoint-")
        # A hidden sibling: Trainer's checkpoint globbing (`checkpoint-*`) never sees it.
        tmp_dir = target.parent / f".{target.name}.srppo-tmp"
        if tmp_dir.exists():
            import shutil

            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        policy_state, critic_state = _split_state_dict(state_dict)
        if state_dict is not None and not state_dict:
            logger.warning(
                "No gathered weights to save in %s (DeepSpeed ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`"
                "): only the DeepSpeed checkpoint holds them; convert it with DeepSpeed's zero_to_fp32.py.",
                target,
            )
        else:
            unwrapped.policy.save_pretrained(tmp_dir, state_dict=policy_state, safe_serialization=True)
            if is_checkpoint or self.args.save_value_model:
                unwrapped.value_model.save_pretrained(
                    tmp_dir / VALUE_MODEL_DIR, state_dict=critic_state, safe_serialization=True
                )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(tmp_dir)
        # The config as JSON (hub tokens redacted by `to_json_string`); no pickled training_args.bin.
        (tmp_dir / "srppo_config.json").write_text(self.args.to_json_string())
        if is_checkpoint:
            (tmp_dir / EXTRA_STATE_FILE).write_text(json.dumps(self._trainer_extra_state(), indent=2))
        move_into_place(tmp_dir, target)

    def _trainer_extra_state(self) -> dict:
        """What a resumed run needs besides the weights and the Trainer's state: the running reward moments
        (`normalize_reward`; the same on every process) and whether `value_bias_init` was done."""
        before = self._reward_moments_before
        return {
            "reward_moments": self._reward_moments.tolist(),
            "reward_moments_before": None if before is None else before.tolist(),
            "reward_moments_buffer": self._reward_moments_buffer,
            "value_bias_initialized": self._value_bias_initialized,
        }

    def _load_trainer_extra_state(self, checkpoint: Path) -> None:
        import torch

        path = checkpoint / EXTRA_STATE_FILE
        if not path.is_file():
            if self.args.normalize_reward or self.args.value_bias_init:
                logger.warning(
                    "%s has no %s (saved by an older version): the reward statistics start afresh and "
                    "value_bias_init is applied at the first buffer of this run.",
                    checkpoint,
                    EXTRA_STATE_FILE,
                )
            return
        state = json.loads(path.read_text())
        before = state["reward_moments_before"]
        self._reward_moments = torch.tensor(state["reward_moments"], dtype=torch.float64)
        self._reward_moments_before = None if before is None else torch.tensor(before, dtype=torch.float64)
        self._reward_moments_buffer = state["reward_moments_buffer"]
        self._value_bias_initialized = state["value_bias_initialized"]


def checkpoint_to_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint `train(resume_from_checkpoint=...)` resumes from: for `True` the last *complete* checkpoint of
    `output_dir`; a given path as it is, refused when incomplete (see `checkpoint_problem`); None for a fresh run."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(
                f"No complete checkpoint in {output_dir} to resume from: train from scratch "
                "(resume_from_checkpoint=None) or pass a checkpoint folder."
            )
    elif resume_from_checkpoint and (problem := checkpoint_problem(resume_from_checkpoint)) is not None:
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete SRPPOTrainer checkpoint ({problem}): the run was probably "
            "killed while saving it; resume from the previous checkpoint (or pass resume_from_checkpoint=True)."
        )
    return resume_from_checkpoint


def unmark_complete(folder: Path) -> None:
    """Remove the mark of a complete checkpoint (`trainer_state.json`) from `folder`, if it has one, before the
    checkpoint is saved anew into it: until the new mark is written, the folder reads as incomplete rather than as a
    complete checkpoint mixing old and new files."""
    if (folder / TRAINER_STATE_NAME).exists():
        logger.info("Overwriting %s with the checkpoint of this run.", folder)
        (folder / TRAINER_STATE_NAME).unlink()


def load_saved_models(policy: nn.Module, value_model: nn.Module, checkpoint: Path) -> None:
    """Load the policy (full weights or adapter) and the critic that `SRPPOTrainer._save` wrote into `checkpoint`."""
    from safetensors.torch import load_file

    for module, folder in ((policy, checkpoint), (value_model, checkpoint / VALUE_MODEL_DIR)):
        if hasattr(module, "peft_config"):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(module, load_file(folder / "adapter_model.safetensors"))
        else:
            _load_pretrained_weights(module, folder)


def _split_state_dict(state_dict: dict | None) -> tuple[dict | None, dict | None]:
    """The wrapper's state dict as (policy's, critic's), their prefixes removed; (None, None) for None."""
    if state_dict is None:
        return None, None
    policy = {k[len("policy.") :]: v for k, v in state_dict.items() if k.startswith("policy.")}
    critic = {k[len("value_model.") :]: v for k, v in state_dict.items() if k.startswith("value_model.")}
    return policy, critic


def _load_pretrained_weights(module: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"No safetensors weights in {folder}: it is not a checkpoint written by SRPPOTrainer.")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        hint = ""
        saved = _saved_critic_top_layers(folder)
        if saved is not False and saved != getattr(module, "top_layers", saved):
            hint = (
                f" The critic was saved with critic_top_layers={saved} but this one was built with "
                f"critic_top_layers={module.top_layers}: pass the same value to build_single_base."
            )
        raise ValueError(
            f"Checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}.{hint}"
        )


def _saved_critic_top_layers(folder: Path):
    """`critic_top_layers` of a single-base critic saved in `folder` (None: every layer), False when not recorded."""
    config = folder / "critic_config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("critic_top_layers", None)


def _is_complete_checkpoint(folder: Path) -> bool:
    return checkpoint_problem(folder) is None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from, in a few words; None when it is a complete checkpoint.

    Complete means: `trainer_state.json` parses (the main process writes it last, and only once every process has
    written its own files, see `_save_rng_state`; it is not written atomically, so a kill can leave it empty or cut
    short); the weights are whole (the policy at the root, the critic in `value_model/`, or DeepSpeed's / FSDP's own
    checkpoint); and, unless saved with `save_only_model`, the optimizer, scheduler and RNG states are whole files.
    The checks read the files' headers and directories, not their contents: cheap for large models. A file that is
    absent makes the Trainer resume without it (silently, for the optimizer and RNG states): not exact.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    problem = _json_problem(folder / TRAINER_STATE_NAME)
    if problem is not None:
        return problem
    engine_state = any(folder.glob("global_step*")) or any(folder.glob("pytorch_model_fsdp*"))
    if not engine_state:  # DeepSpeed and FSDP resume from their own checkpoint; their formats are theirs to check
        for weights, what in ((folder, "the policy"), (folder / VALUE_MODEL_DIR, VALUE_MODEL_DIR)):
            problem = _weights_problem(weights, what)
            if problem is not None:
                return problem
    if _saved_with_only_model(folder):
        return None
    states = [] if engine_state else ["optimizer.pt", "scheduler.pt"]
    rng = sorted(p.name for p in folder.glob("rng_state*.pth")) or ["rng_state.pth"]
    for name in states + rng:
        problem = _torch_file_problem(folder / name)
        if problem is not None:
            return problem
    return None


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"no {path.name}"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is empty or cut short"
    return None


def saved_model_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` does not hold a whole model saved with `save_pretrained` (its `config.json` parses, its
    safetensors weights are whole), in a few words; None when it does."""
    folder = Path(folder)
    return _json_problem(folder / "config.json") or _weights_problem(folder, folder.name)


def saved_adapter_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` does not hold a whole PEFT adapter saved with `save_pretrained` (its `adapter_config.json` parses,
    its `adapter_model.safetensors` is whole), in a few words; None when it does."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        return f"no adapter weights in {folder.name}"
    return _json_problem(folder / "adapter_config.json") or _weights_problem(folder, folder.name)


def _weights_problem(folder: Path, where: str) -> str | None:
    """Why the safetensors weights saved in `folder` (adapter, single file or shards) are not whole; None if they are."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        problem = _json_problem(index)
        if problem is not None:
            return problem
        files = sorted({folder / name for name in json.loads(index.read_text()).get("weight_map", {}).values()})
    else:
        files = [p for p in (folder / "adapter_model.safetensors", folder / "model.safetensors") if p.is_file()]
    if not files:
        return f"no weights for {where}"
    for file in files:
        if not _is_whole_safetensors(file):
            return f"{where}'s {file.name} is missing or cut short"
    return None


def _is_whole_safetensors(path: Path) -> bool:
    """True when `path` holds a safetensors header that parses and exactly the tensor bytes it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if size < 8 + header_size:
                return False
            header = json.loads(f.read(header_size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return size == 8 + header_size + max(ends, default=0)


def _torch_file_problem(path: Path) -> str | None:
    """`torch.save` writes a zip archive whose directory comes last: a file cut short has none."""
    import zipfile

    if not path.is_file():
        return f"no {path.name}"
    try:
        with zipfile.ZipFile(path):
            return None
    except (OSError, zipfile.BadZipFile):
        return f"{path.name} is empty or cut short"


def _saved_with_only_model(folder: Path) -> bool:
    config = folder / "srppo_config.json"
    try:
        return bool(json.loads(config.read_text()).get("save_only_model"))
    except (OSError, ValueError):
        return False


def trainer_checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint of a plain TRL/transformers `Trainer` (e.g. the DPOTrainer of SPIN) in `folder` cannot be
    resumed from, in a few words; None when its `trainer_state.json` parses and its weights are whole (a kill while
    saving leaves either cut short, and `transformers.trainer_utils.get_last_checkpoint` would pick it anyway)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    return _json_problem(folder / TRAINER_STATE_NAME) or _weights_problem(folder, folder.name)


def last_complete_checkpoint(output_dir: str | os.PathLike, problem=None) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that is complete: `problem(folder)` is None
    (default: `checkpoint_problem`, an SRPPOTrainer checkpoint; `trainer_checkpoint_problem` for other trainers)."""
    problem_of = problem or checkpoint_problem
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for entry in folder.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            steps.append((int(name[len("checkpoint-") :]), entry))
    for _, entry in sorted(steps, reverse=True):
        problem = problem_of(entry)
        if problem is None:
            return str(entry)
        logger.warning(
            "Skipping %s: incomplete checkpoint (%s; the run was probably killed while saving it).", entry, problem
        )
    return None


# Files that make up a saved model: stale ones from an earlier save of another kind (sharded vs. single file, full
# model vs. adapter) are removed so that the folder never mixes two models.
_MODEL_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*", "adapter_config.json")


# The files whose parsing marks a saved folder as complete (`saved_model_problem`, `saved_adapter_problem`).
_COMPLETION_MARKERS = ("config.json", "adapter_config.json")


def move_into_place(tmp_dir: Path, target: Path) -> None:
    """Put the finished save in `tmp_dir` in place of `target`: a folder whose completion marker parses always holds
    one whole save, never a mix of two (a crash between removing the old markers and moving in the new ones leaves a
    folder without a marker, which loaders and `last_complete_checkpoint` treat as incomplete).

    When `target` does not exist (every new checkpoint) this is one atomic rename. Otherwise (the final model saved
    into an `output_dir` that also holds checkpoints and logs; the pipeline's `sft/` folder that holds the stages'
    folders) `tmp_dir`'s entries replace same-named ones one atomic rename at a time (a folder through a `.old`
    sibling), so each is the old or the new complete one, never a partial one. Entries of `target` that `tmp_dir` does
    not have are kept, except the model files of an earlier save. The completion markers (`config.json`,
    `adapter_config.json`) are removed first and moved in last: a folder whose marker parses holds the whole new model.
    A save that fails before this call (while writing `tmp_dir`) leaves `target` untouched.
    """
    import shutil

    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, target)
        return
    entries = sorted(tmp_dir.iterdir(), key=lambda entry: entry.name in _COMPLETION_MARKERS)
    new_names = {entry.name for entry in entries}
    stale = {p for pattern in _MODEL_FILE_PATTERNS for p in target.glob(pattern) if p.name not in new_names}
    markers = [entry for entry in entries if entry.name in _COMPLETION_MARKERS]
    for marker in markers:
        (target / marker.name).unlink(missing_ok=True)
    for entry in entries[: len(entries) - len(markers)]:
        dest = target / entry.name
        if dest.is_dir():
            old = target / (entry.name + ".old")
            shutil.rmtree(old, ignore_errors=True)  # left by a crash in an earlier move
            os.replace(dest, old)
            os.replace(entry, dest)
            shutil.rmtree(old)
        else:
            os.replace(entry, dest)
    for path in stale:
        path.unlink()
    for marker in markers:
        os.replace(marker, target / marker.name)
    tmp_dir.rmdir()
