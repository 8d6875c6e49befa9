"""Reliability of SRPPOTrainer: exact resume, crash-safe saving, clear errors on bad input, numerical guards.

Shrunk hyper-parameters, everywhere below: tiny models (srppo_trl.testing), 8 prompts, responses of 6 tokens (the paper
samples a few hundred), rollout batches of 4 prompts (paper: 1024), learning rates of 1e-3 (paper: ~1e-8 actor, 9e-6
critic) so that a few optimizer steps visibly move the weights.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and lose 10x when other processes share the 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)]})


def _args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        num_mini_batches=2,  # rollout batch of 4 prompts, 2 optimizer steps per PPO epoch
        num_ppo_epochs=2,  # 4 optimizer steps per rollout buffer
        response_length=6,  # shrunk: tiny models, fast tests
        learning_rate=1e-3,  # shrunk steps need a large step size to move parameters visibly
        critic_learning_rate=3e-3,  # differs from the policy's: the critic gets its own optimizer groups
        max_steps=12,  # 3 rollout buffers over 1.5 epochs of the 8 prompts
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    return SRPPOConfig(**kwargs)


def _trainer(tokenizer, output_dir, peft_config=None, callbacks=None, reward_model=None, **overrides):
    """A trainer built the same way every time (same seeds), so two of them start from identical weights."""
    if reward_model is None:
        reward_model = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    torch.manual_seed(3)  # the critic's fresh value head
    return SRPPOTrainer(
        args=_args(output_dir, **overrides),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward_model,
        train_dataset=_prompts(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


class _CrashAt(TrainerCallback):
    """Simulates a pre-emption: raises once the given optimizer step is done (after the Trainer saved, if due)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def _weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _logged_steps(trainer):
    return [h["step"] for h in trainer.state.log_history if "loss" in h]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{name} differs after resume")


def _run_interrupted_and_resumed(tokenizer, tmp_path, crash_at, resume_from, **overrides):
    straight = _trainer(tokenizer, tmp_path / "straight", **overrides)
    straight.train()

    crashed = _trainer(tokenizer, tmp_path / "resumed", callbacks=[_CrashAt(crash_at)], **overrides)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{resume_from}"
    assert (checkpoint / "trainer_state.json").exists()

    resumed = _trainer(tokenizer, tmp_path / "resumed", **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return straight, resumed


@pytest.mark.parametrize(
    "crash_at, resume_from, overrides",
    [
        # Crash at step 6, in the middle of the second rollout buffer; the last checkpoint is at step 4.
        pytest.param(6, 4, {}, id="full"),
        pytest.param(6, 4, dict(gradient_accumulation_steps=2, per_device_train_batch_size=1), id="grad-accum"),
        # Warm-up covers buffers 1-2 (steps 1-8): the crash and the resume fall inside it, the actor starts after.
        pytest.param(6, 4, dict(critic_warmup_steps=2), id="warmup-spans-crash"),
        # Second pass over the prompts (8 per epoch = 8 steps): the resumed sampler must reshuffle as epoch 1.
        pytest.param(14, 12, dict(max_steps=16), id="second-epoch"),
    ],
)
def test_resume_gives_the_weights_of_an_uninterrupted_run(tokenizer, tmp_path, crash_at, resume_from, overrides):
    straight, resumed = _run_interrupted_and_resumed(tokenizer, tmp_path, crash_at, resume_from, **overrides)
    steps = straight.args.max_steps
    assert resumed.state.global_step == straight.state.global_step == steps
    _assert_same_weights(_weights(resumed), _weights(straight))
    assert _logged_steps(resumed) == _logged_steps(straight) == list(range(1, steps + 1))
    for key in ("objective/scores", "loss/value_avg", "critic_warmup"):
        got = [h[key] for h in resumed.state.log_history if key in h]
        want = [h[key] for h in straight.state.log_history if key in h]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), key




def test_resume_of_a_lora_policy_at_an_epoch_boundary(tokenizer, tmp_path):
    # Checkpoint 8 closes the first pass over the 8 prompts: the resumed run starts a new epoch (new shuffle).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    straight, resumed = _run_interrupted_and_resumed(tokenizer, tmp_path, crash_at=10, resume_from=8, peft_config=lora)
    _assert_same_weights(_weights(resumed), _weights(straight))
    assert _logged_steps(resumed) == list(range(1, 13))


def test_resume_true_skips_a_checkpoint_left_incomplete_by_a_crash(tokenizer, tmp_path):
    out = tmp_path / "run"
    crashed = _trainer(tokenizer, out, callbacks=[_CrashAt(6)], max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    # A run killed while the Trainer was writing checkpoint-8: the model is there, the trainer state is not.
    partial = out / "checkpoint-8"
    crashed._save(str(partial))
    assert not (partial / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="not a complete SRPPOTrainer checkpoint"):
        _trainer(tokenizer, out, max_steps=8).train(resume_from_checkpoint=str(partial))

    resumed = _trainer(tokenizer, out, max_steps=8)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-4
    assert _logged_steps(resumed) == list(range(1, 9))


# ---------------------------------------------------------------- saving never leaves a partial model in place


def _crash_while_saving(trainer, monkeypatch):
    """Make the next save die after the weights are written, before the tokenizer (a crash in the middle)."""

    def die(*args, **kwargs):
        raise OSError("simulated crash while saving")

    monkeypatch.setattr(trainer.processing_class, "save_pretrained", die)


def test_a_crash_while_saving_leaves_the_previous_model_loadable(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    trainer = _trainer(tokenizer, tmp_path / "run", max_steps=4, save_strategy="no")
    final = tmp_path / "final"
    trainer.save_model(str(final))
    saved = {n: p.clone() for n, p in trainer.model.policy.state_dict().items()}
    trainer.train()  # moves the weights
    _crash_while_saving(trainer, monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_model(str(final))
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    for name, param in reloaded.state_dict().items():
        assert torch.equal(param, saved[name]), f"{name} was overwritten by the interrupted save"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["final", "run"]


def test_a_crash_while_checkpointing_leaves_no_checkpoint_folder(tokenizer, tmp_path, monkeypatch):
    class CrashOnSecondSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                _crash_while_saving(trainer, monkeypatch)

    trainer = _trainer(tokenizer, tmp_path, max_steps=8, callbacks=[CrashOnSecondSave()])
    with pytest.raises(OSError, match="simulated crash"):
        trainer.train()
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4"]
    from srppo_trl.trainer import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


# ---------------------------------------------------------------- non-finite values stop training after a checkpoint


class _NaNBaseModelReward(CoherentRewardModel):
    """A coherent reward whose pretrained log-probs turn NaN on row 1 from the `start`-th rollout buffer on."""

    def __init__(self, *args, start, **kwargs):
        super().__init__(*args, **kwargs)
        self.start, self.calls = start, 0

    def base_log_probs(self, input_ids, attention_mask, response_mask):
        out = super().base_log_probs(input_ids, attention_mask, response_mask)
        self.calls += 1
        if self.calls >= self.start:
            out[1, -1] = float("nan")
        return out


def _saved_policy(checkpoint):
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "model.safetensors")


def _assert_checkpoint_holds(trainer, checkpoint):
    assert (Path(checkpoint) / "trainer_state.json").exists()
    assert (Path(checkpoint) / "optimizer.pt").exists()
    state = trainer.model.policy.state_dict()
    for name, tensor in _saved_policy(checkpoint).items():
        assert torch.equal(tensor, state[name]), name


def test_nan_reward_stops_with_step_rows_and_a_checkpoint_of_the_last_good_state(tokenizer, tmp_path):
    reward = _NaNBaseModelReward(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2), start=2)
    trainer = _trainer(tokenizer, tmp_path, reward_model=reward, save_strategy="no")
    with pytest.raises(FloatingPointError, match=r"step 4 .*scores in rows \[1\]") as error:
        trainer.train()
    assert "checkpoint-4" in str(error.value)
    assert trainer.state.global_step == 4
    _assert_checkpoint_holds(trainer, tmp_path / "checkpoint-4")


def test_inf_logprobs_are_caught_before_any_update(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, save_strategy="no")
    original = trainer.score_rollouts

    def inf_logprobs(rollouts):
        scored = original(rollouts)
        scored["logprobs"][2, 0] = -float("inf")
        return scored

    trainer.score_rollouts = inf_logprobs
    before = _weights(trainer)
    with pytest.raises(FloatingPointError, match=r"step 0 .*logprobs in rows \[2\]"):
        trainer.train()
    _assert_same_weights(_weights(trainer), before)
    _assert_checkpoint_holds(trainer, tmp_path / "checkpoint-0")


def test_nan_loss_never_steps_the_optimizer(tokenizer, tmp_path, monkeypatch):
    from srppo_trl import ppo_math

    policy_loss, calls = ppo_math.policy_loss, []

    def nan_on_third_call(*args, **kwargs):
        calls.append(1)
        loss, stats = policy_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(ppo_math, "policy_loss", nan_on_third_call)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = _weights(trainer)

    # Gradient accumulation: the NaN comes on the first micro-step of optimizer step 2, after step 1's update.
    trainer = _trainer(
        tokenizer, tmp_path, save_strategy="no", callbacks=[Snapshot()], gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="Non-finite loss at optimizer step 1") as error:
        trainer.train()
    assert "optimizer" in str(error.value) and "checkpoint-1" in str(error.value)
    assert list(snapshots) == [1]
    _assert_same_weights(_weights(trainer), snapshots[1])
    _assert_checkpoint_holds(trainer, tmp_path / "checkpoint-1")
