"""Crash-safe resume: a run killed at any moment resumes from its last *complete* checkpoint to the weights of an
uninterrupted run.

Fast tests break the newest checkpoint the way a kill (or a power cut) leaves it and resume with
`resume_from_checkpoint=True`. The slow tests SIGKILL real training processes (one, and two under
`accelerate launch`) at random moments, many times, and resume each to the end.

Shrunk hyper-parameters: tiny models (srppo_trl.testing), 8 prompts, 6-token responses, one optimizer step per rollout
buffer so that every step can be a checkpoint, learning rate 1e-3 (paper: ~1e-8 actor, 9e-6 critic) so that the
weights visibly move.
"""

import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _trainer(tokenizer, output_dir, callbacks=None, **overrides):
    """A trainer built the same way every time (same seeds), so two of them start from identical weights."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        rollout_batch_size=4,  # mini batches of 2 prompts
        num_ppo_epochs=1,  # 2 optimizer steps per rollout buffer
        response_length=6,  # shrunk: tiny models, fast tests
        learning_rate=1e-3,  # shrunk runs need a large step size to move parameters visibly
        critic_learning_rate=3e-3,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,  # checkpoint-2 and checkpoint-4
        report_to="none",
        seed=0,
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
    )
    kwargs.update(overrides)
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    torch.manual_seed(3)  # the critic's fresh value head
    prompts = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(8)]}
    )
    return SRPPOTrainer(
        args=SRPPOConfig(**kwargs),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward,
        train_dataset=prompts,
        callbacks=callbacks,
    )


def _weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


class _StepsRun(TrainerCallback):
    """The optimizer steps this trainer ran (a resumed run's log history also holds the checkpoint's)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def finished_run(tokenizer, tmp_path_factory):
    """(output_dir with checkpoint-2 and checkpoint-4, final weights) of one uninterrupted run."""
    out = tmp_path_factory.mktemp("finished")
    with _one_thread():
        trainer = _trainer(tokenizer, out)
        trainer.train()
    return out, _weights(trainer)


class _one_thread:
    # Tiny models gain nothing from intra-op threads, and lose 10x when other processes share the cores.
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _cut(path: Path) -> None:
    """Keep the first half of the file: what a kill in the middle of writing it leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# What a kill (or a power cut) can leave in the newest checkpoint: each must send the resume to the one before.
BREAKS = {
    "trainer-state-empty": lambda ckpt: (ckpt / "trainer_state.json").write_text(""),
    "trainer-state-cut": lambda ckpt: _cut(ckpt / "trainer_state.json"),
    "trainer-state-missing": lambda ckpt: (ckpt / "trainer_state.json").unlink(),
    "optimizer-cut": lambda ckpt: _cut(ckpt / "optimizer.pt"),
    "optimizer-missing": lambda ckpt: (ckpt / "optimizer.pt").unlink(),
    "scheduler-missing": lambda ckpt: (ckpt / "scheduler.pt").unlink(),
    "rng-state-empty": lambda ckpt: (ckpt / "rng_state.pth").write_bytes(b""),
    "rng-state-missing": lambda ckpt: (ckpt / "rng_state.pth").unlink(),
    "policy-weights-cut": lambda ckpt: _cut(ckpt / "model.safetensors"),
    "critic-weights-cut": lambda ckpt: _cut(ckpt / "value_model" / "model.safetensors"),
    "critic-weights-missing": lambda ckpt: shutil.rmtree(ckpt / "value_model"),
}


@pytest.mark.parametrize("damage", list(BREAKS))
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_with_the_uninterrupted_weights(
    tokenizer, tmp_path, finished_run, damage
):
    finished, want = finished_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    BREAKS[damage](out / "checkpoint-4")

    from srppo_trl.trainer import last_complete_checkpoint

    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    with _one_thread():
        ran = _StepsRun()
        resumed = _trainer(tokenizer, out, callbacks=[ran])
        resumed.train(resume_from_checkpoint=True)
    assert ran.steps == [3, 4]  # resumed from checkpoint-2, not from the damaged checkpoint-4
    got = _weights(resumed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{name} differs after resume")
    # The damaged folder was written anew by the resumed run: it is a complete checkpoint again.
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")


def test_an_explicit_damaged_checkpoint_is_refused_with_the_reason(tokenizer, tmp_path, finished_run):
    finished, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint-4" / "trainer_state.json").write_text("")
    with pytest.raises(ValueError, match=r"not a complete SRPPOTrainer checkpoint \(trainer_state.json is empty"):
        _trainer(tokenizer, out).train(resume_from_checkpoint=str(out / "checkpoint-4"))
