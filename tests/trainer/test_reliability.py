"""Reliability of SRPPOTrainer: exact resume, crash-safe saving, clear errors on bad input, numerical guards.

Shrunk hyper-parameters, everywhere below: tiny models (srppo_trl.testing), 8 prompts, responses of 6 tokens (the paper
samples a few hundred), rollout batches of 4 prompts (paper: 1024), learning rates of 1e-3 (paper: ~1e-8 actor, 9e-6
critic) so that a few optimizer steps visibly move the weights.
"""

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
        rollout_batch_size=4,  # mini batches of 2 prompts: 2 optimizer steps per PPO epoch
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
        # Defaults of SRPPOConfig before it took TRL 1.12 PPOConfig's, pinned so this test is unchanged.
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
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
        # The running reward moments and the value-bias flag come back from the checkpoint: the resumed run
        # normalises by the moments of all earlier buffers and does not shift the critic's bias again.
        pytest.param(6, 4, dict(normalize_reward=True, value_bias_init=True), id="reward-norm-and-value-bias"),
    ],
)
def test_resume_gives_the_weights_of_an_uninterrupted_run(tokenizer, tmp_path, crash_at, resume_from, overrides):
    straight, resumed = _run_interrupted_and_resumed(tokenizer, tmp_path, crash_at, resume_from, **overrides)
    steps = straight.args.max_steps
    assert resumed.state.global_step == straight.state.global_step == steps
    _assert_same_weights(_weights(resumed), _weights(straight))
    assert _logged_steps(resumed) == _logged_steps(straight) == list(range(1, steps + 1))
    for key in (
        "objective/scores",
        "loss/value_avg",
        "critic_warmup",
        "objective/normalized_scores",
        "reward_norm/std",
    ):
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
    from srppo_trl.trainer.srppo_trainer import last_complete_checkpoint

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
        scored.logprobs[2, 0] = -float("inf")
        return scored

    trainer.score_rollouts = inf_logprobs
    before = _weights(trainer)
    with pytest.raises(FloatingPointError, match=r"step 0 .*logprobs in rows \[2\]"):
        trainer.train()
    _assert_same_weights(_weights(trainer), before)
    _assert_checkpoint_holds(trainer, tmp_path / "checkpoint-0")


def test_nan_loss_never_steps_the_optimizer(tokenizer, tmp_path, monkeypatch):
    from srppo_trl.trainer import ppo_math

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


# ---------------------------------------------------------------- bad input: one clear sentence, before any compute
# (tests/test_trainer.py covers: vocabularies of policy vs SFT, a reward model of the wrong type, no `prompt` column,
# a prompt longer than max_prompt_length, and the SRPPOConfig checks.)


def _build(tokenizer, tmp_path, data=None, reward_model=None, value_model=None, **overrides):
    reward_model = reward_model or CoherentRewardModel(
        tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    )
    return SRPPOTrainer(
        args=_args(tmp_path, **overrides),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=_prompts() if data is None else data,
    )


def test_sft_and_base_tokenizers_with_different_vocabularies_are_refused():
    from srppo_trl.models.coherent_reward import check_same_tokenizer

    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ValueError, match="different vocabularies"):
        check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(vocab_size=320))


def test_sft_and_base_models_with_different_vocabularies_are_refused(tokenizer):
    with pytest.raises(ValueError, match="vocabulary of"):
        CoherentRewardModel(tiny_causal_lm(tokenizer), tiny_causal_lm(tiny_tokenizer(vocab_size=320)))


def test_tokenizer_larger_than_the_models_vocabulary_is_refused(tokenizer, tmp_path):
    bigger = tiny_tokenizer()
    bigger.add_tokens([f"<extra_{i}>" for i in range(4)])
    with pytest.raises(ValueError, match=f"tokenizer has {len(bigger)} tokens"):
        SRPPOTrainer(
            args=_args(tmp_path), processing_class=bigger, model=tiny_causal_lm(tokenizer, seed=1),
            reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
            train_dataset=_prompts(),
        )  # fmt: skip


@pytest.mark.parametrize(
    "data, message",
    [
        (Dataset.from_dict({"prompt": []}), "is empty"),
        (_prompts(3), "needs rollout_batch_size=4"),
        (Dataset.from_dict({"prompt": ["short", "word " * 600]}), "exceeds the model's context of 512"),
    ],
    ids=["empty", "smaller-than-a-rollout-batch", "prompt-beyond-context"],
)
def test_unusable_datasets_are_refused(tokenizer, tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        _build(tokenizer, tmp_path, data=data, max_prompt_length=None)


def test_response_length_beyond_the_context_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="response_length=600 exceeds the model's context"):
        _build(tokenizer, tmp_path, response_length=600)


def test_sequence_classifier_with_several_labels_is_refused(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_config(_classifier_config(tokenizer, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        _build(tokenizer, tmp_path, reward_model=classifier)


@pytest.mark.parametrize("kind", ["causal-lm", "two-labels"])
def test_value_model_without_a_scalar_head_is_refused(tokenizer, tmp_path, kind):
    from transformers import AutoModelForTokenClassification

    if kind == "causal-lm":
        critic = tiny_causal_lm(tokenizer, seed=1)
    else:
        critic = AutoModelForTokenClassification.from_config(_classifier_config(tokenizer, num_labels=2))
    with pytest.raises(ValueError, match="one scalar per token"):
        _build(tokenizer, tmp_path, value_model=critic)


def test_value_bias_init_needs_a_head_with_a_bias(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_config(_classifier_config(tokenizer))  # `score` has no bias
    with pytest.raises(ValueError, match="no trainable bias"):
        _build(tokenizer, tmp_path, value_model=critic, value_bias_init=True)


def _classifier_config(tokenizer, num_labels=1):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        # A mini batch of 4 prompts (2 per device x 2 accumulation steps) cannot tile a rollout batch of 6.
        (dict(rollout_batch_size=6, num_mini_batches=None), "divisible"),
        (dict(num_mini_batches=0), "num_mini_batches"),
        (dict(num_ppo_epochs=0), "num_ppo_epochs"),
        (dict(critic_warmup_steps=-1), "critic_warmup_steps"),
    ],
)
def test_incoherent_batch_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, gradient_accumulation_steps=2, **overrides)


# ---------------------------------------------------------------- a tokenizer whose pad token is its EOS token


@pytest.fixture(scope="module")
def pad_is_eos():
    # SmolLM2's tokenizer ships like this: padding with the very token that ends a response.
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hand_made_rollouts(trainer, tokenizer):
    """Left-padded prompts of different lengths and responses ending at different places, padded with EOS."""
    data = trainer.train_dataset
    batch = trainer._collate([data[i] for i in range(4)])
    eos = tokenizer.eos_token_id
    words = tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    rows = [words[:1] + [eos] * 5, words[:3] + [eos] * 3, words[:5] + [eos], words[:5] + words[:1]]  # last: no EOS
    response = torch.tensor([row[:6] for row in rows])
    from srppo_trl.trainer.rollout import RolloutBuffer, response_mask_after_stop

    response_mask, has_stop = response_mask_after_stop(response, eos)
    return RolloutBuffer(
        query=batch["input_ids"], query_mask=batch["attention_mask"], response=response,
        response_mask=response_mask, has_stop=has_stop,
    )  # fmt: skip


def _unpadded(rollouts, i):
    """Row i without padding: (prompt + response tokens up to the first EOS) as a [1, L] tensor, and the prompt length."""
    prompt = rollouts.query[i][rollouts.query_mask[i].bool()]
    response = rollouts.response[i][rollouts.response_mask[i].bool()]
    return torch.cat([prompt, response]).unsqueeze(0), len(prompt)


def test_pad_equal_to_eos_gives_the_reward_of_the_unpadded_response(pad_is_eos, tmp_path):
    data = Dataset.from_dict({"prompt": ["hi", "What is 12 plus 7?", "List three fruits", "Explain the sky"]})
    trainer = _build(pad_is_eos, tmp_path, data=data, per_device_train_batch_size=1, num_mini_batches=4)
    rollouts = _hand_made_rollouts(trainer, pad_is_eos)
    assert rollouts.query_mask.sum(-1).unique().numel() > 1  # the prompts really are left-padded (with EOS)
    assert rollouts.response_mask.sum(-1).tolist() == [2, 4, 6, 6]  # up to the first EOS, which counts
    scored = trainer.score_rollouts(rollouts)
    for i in range(4):
        ids, prompt_length = _unpadded(rollouts, i)
        response_mask = torch.zeros_like(ids)
        response_mask[:, prompt_length:] = 1
        direct = trainer.reward_model(ids, torch.ones_like(ids), response_mask)
        torch.testing.assert_close(scored.coherent_reward[i], direct[0], rtol=1e-4, atol=1e-5)


def test_pad_equal_to_eos_sequence_classifier_reads_the_score_at_the_first_eos(pad_is_eos, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(_classifier_config(pad_is_eos))
    data = Dataset.from_dict({"prompt": ["hi", "What is 12 plus 7?", "List three fruits", "Explain the sky"]})
    trainer = SRPPOTrainer(
        args=_args(tmp_path, per_device_train_batch_size=1, num_mini_batches=4), processing_class=pad_is_eos,
        model=tiny_causal_lm(pad_is_eos, seed=1), ref_model=tiny_causal_lm(pad_is_eos, seed=1),
        reward_model=classifier, train_dataset=data,
    )  # fmt: skip
    rollouts = _hand_made_rollouts(trainer, pad_is_eos)
    scored = trainer.score_rollouts(rollouts)
    for i in range(4):
        ids, _ = _unpadded(rollouts, i)
        with torch.no_grad():
            hidden = classifier.model(input_ids=ids).last_hidden_state[:, -1]  # the response's last token: its EOS
            direct = classifier.score(hidden).squeeze(-1)
        torch.testing.assert_close(scored.scores[i], direct[0], rtol=1e-4, atol=1e-5)


def test_pad_equal_to_eos_trains_end_to_end(pad_is_eos, tmp_path):
    trainer = _build(pad_is_eos, tmp_path, max_steps=4, save_strategy="no")
    trainer.train()
    assert _logged_steps(trainer) == [1, 2, 3, 4]
