"""Saving, crash safety and exact resume of `SRPPOTrainer`.

Checkpoints hold the policy (full weights or adapter) at the root, loadable with `from_pretrained`, and the critic in
`value_model/`, all in safetensors, plus the Trainer's optimizer/scheduler/RNG state. Saves go through a temporary
folder renamed into place; `resume_from_checkpoint=True` picks the last *complete* checkpoint; a non-finite value
stops training after saving the last good state. `CheckpointMixin` is a part of `SRPPOTrainer`.
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


class CheckpointMixin:
    """`SRPPOTrainer`'s saving and resuming methods."""

    def _save_last_good_state(self) -> str:
        """Checkpoint the current weights, optimizer, scheduler and RNG states through the Trainer's machinery.

        Called when a non-finite value stops training: it is raised before any backward pass of the current micro-step
        and before the optimizer step, so the weights are still those of the last good optimizer step. An existing
        complete checkpoint of this step is kept as it is.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=None)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        exists = _is_complete_checkpoint(Path(checkpoint))
        self.accelerator.wait_for_everyone()
        if not exists:
            self.model.zero_grad(set_to_none=True)
            self._save_checkpoint(self.model, trial=None)
        return checkpoint

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Saves the policy (or its adapter) and the tokenizer at the root of `output_dir`, loadable with
        `from_pretrained`; the critic in `value_model/` for checkpoints (and the final model with `save_value_model`).
        Saving goes through a temporary folder renamed into place, so a crash never leaves a half-written model where
        a finished one was.

        `state_dict` is what `Trainer.save_model` gathered from the wrapped model (the full weights under DeepSpeed
        ZeRO-3 or FSDP, where the unwrapped modules hold only this process's shards): when given, it is what gets
        written, split into the policy's (`policy.*`) and the critic's (`value_model.*`) weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
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
        _replace_dir(tmp_dir, target)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the last *complete* checkpoint of `output_dir`.

        A checkpoint is complete once `trainer_state.json`, which the Trainer writes last, is in it: a run killed
        while checkpointing leaves an incomplete folder, which is skipped (with a warning) rather than resumed from.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint in {self.args.output_dir} to resume from: train from scratch "
                    "(resume_from_checkpoint=None) or pass a checkpoint folder."
                )
        elif resume_from_checkpoint and not _is_complete_checkpoint(Path(resume_from_checkpoint)):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete SRPPOTrainer checkpoint (no trainer_state.json, or no "
                "weights): the run was probably killed while saving it; resume from the previous checkpoint."
            )
        if resume_from_checkpoint:
            self._load_trainer_extra_state(Path(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Loads the policy (full weights or adapter) and the critic saved by `_save`."""
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        checkpoint = Path(resume_from_checkpoint)
        for module, folder in ((unwrapped.policy, checkpoint), (unwrapped.value_model, checkpoint / VALUE_MODEL_DIR)):
            if hasattr(module, "peft_config"):
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(module, load_file(folder / "adapter_model.safetensors"))
            else:
                _load_pretrained_weights(module, folder)
        self._buffer, self._step = None, None


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
    """True for a checkpoint folder holding the Trainer's state (written last) and the policy's weights."""
    weights = (
        any(folder.glob("model*.safetensors"))
        or (folder / "adapter_model.safetensors").exists()
        or any(folder.glob("global_step*"))  # DeepSpeed's own checkpoint (ZeRO-3 without gathering on save)
        or any(folder.glob("pytorch_model_fsdp*"))  # FSDP's sharded state dict
    )
    return (folder / "trainer_state.json").is_file() and weights


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that is complete (see `_is_complete_checkpoint`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for entry in folder.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            steps.append((int(name[len("checkpoint-") :]), entry))
    for _, entry in sorted(steps, reverse=True):
        if _is_complete_checkpoint(entry):
            return str(entry)
        logger.warning("Skipping %s: incomplete checkpoint (the run was killed while saving it).", entry)
    return None


# Files that make up a saved model: stale ones from an earlier save of another kind (sharded vs. single file, full
# model vs. adapter) are removed so that the folder never mixes two models.
_MODEL_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model*", "adapter_config.json")


def _replace_dir(tmp_dir: Path, target: Path) -> None:
    """Put the finished save in `tmp_dir` in place of `target`.

    When `target` does not exist (every new checkpoint) this is one atomic rename. Otherwise (the final model saved
    into an existing `output_dir` that also holds checkpoints and logs) `tmp_dir`'s entries replace same-named ones one
    atomic rename at a time: a crash leaves each file either the old or the new complete one, never a partial file.
    Entries of `target` that `tmp_dir` does not have are kept, except stale model files of an earlier save.
    """
    import shutil

    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, target)
        return
    new_names = {entry.name for entry in tmp_dir.iterdir()}
    stale = {p for pattern in _MODEL_FILE_PATTERNS for p in target.glob(pattern) if p.name not in new_names}
    for entry in tmp_dir.iterdir():
        dest = target / entry.name
        if dest.is_dir():
            old = target / (entry.name + ".old")
            os.replace(dest, old)
            os.replace(entry, dest)
            shutil.rmtree(old)
        else:
            os.replace(entry, dest)
    tmp_dir.rmdir()
    for path in stale:
        path.unlink()
