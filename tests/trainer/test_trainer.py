"""SRPPOTrainer on tiny models built locally (CPU, seconds each).

Shrunk hyper-parameters, everywhere below: responses of 6-8 tokens (the paper samples up to a few hundred), rollout
batches of 4-8 prompts (paper: 1024), learning rates of 1e-3 (paper: ~1e-8 actor, 9e-6 critic) so that a handful of
steps visibly moves a 40k-parameter model.
"""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, LlamaConfig

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer
from srppo_trl.trainer import ppo_math
from srppo_trl.trainer.rollout import RolloutBuffer
from srppo_trl.trainer.srppo_trainer import response_mask_after_stop


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


_prompts = tiny_prompts  # shared with the other trainer tests (srppo_trl.testing)
_args = tiny_srppo_config


def _trainer(tokenizer, tmp_path, kind="llama", **overrides):
    sft, pt = tiny_causal_lm(tokenizer, kind, seed=1), tiny_causal_lm(tokenizer, kind, seed=2)
    policy = tiny_causal_lm(tokenizer, kind, seed=1)  # initialised from the SFT weights
    reward = CoherentRewardModel(sft, pt)
    peft_config = overrides.pop("peft_config", None)
    return SRPPOTrainer(
        args=_args(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        train_dataset=_prompts(),
        peft_config=peft_config,
    )


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_training_changes_every_trainable_parameter_and_no_frozen_one(tokenizer, tmp_path, kind, granularity):
    trainer = _trainer(tokenizer, tmp_path, kind=kind, reward_granularity=granularity)
    trainable = _snapshot(trainer.model)
    frozen = _snapshot(trainer.reward_model)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, trainable[name]), f"{name} did not change"
    for name, param in trainer.reward_model.named_parameters():
        assert torch.equal(param, frozen[name]), f"frozen {name} changed"
    logged = trainer.state.log_history[0]
    for key in ("objective/kl", "objective/scores", "objective/coherent_reward", "objective/rlhf_reward",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                "completions/mean_length", "completions/eos_rate"):  # fmt: skip
        assert key in logged, key


def test_critic_warmup_leaves_the_policy_unchanged_and_trains_the_critic(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, critic_warmup_steps=2, max_steps=2)
    policy, critic = _snapshot(trainer.model.policy), _snapshot(trainer.model.value_model)
    trainer.train()
    assert all(torch.equal(p, policy[n]) for n, p in trainer.model.policy.named_parameters())
    assert all(not torch.equal(p, critic[n]) for n, p in trainer.model.value_model.named_parameters())
    assert all(h.get("critic_warmup", 1.0) == 1.0 for h in trainer.state.log_history if "critic_warmup" in h)


def test_a_warmup_covering_the_whole_run_is_warned_about(tokenizer, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="srppo_trl.trainer"):
        _trainer(tokenizer, tmp_path, critic_warmup_steps=2, max_steps=2)
    assert "covers all 2 rollout buffers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="srppo_trl.trainer"):
        _trainer(tokenizer, tmp_path, critic_warmup_steps=40, max_steps=41)  # a long warm-up is fine
    assert "covers all" not in caplog.text


def test_warmup_buffers_are_dropped_before_the_first_actor_update(tokenizer, tmp_path):
    # 1 warm-up buffer then 1 actor buffer: the actor's buffer is generated fresh, not the warm-up one reused.
    trainer = _trainer(tokenizer, tmp_path, critic_warmup_steps=1, max_steps=2)
    buffers = []
    original = trainer.make_rollout_buffer

    def spy(batch):
        buffer = original(batch)
        buffers.append(buffer)
        return buffer

    trainer.make_rollout_buffer = spy
    trainer.train()
    assert [b.warmup for b in buffers] == [True, False]
    assert buffers[0] is not buffers[1]


def test_lora_policy_trains_only_the_adapter(tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tokenizer, tmp_path, peft_config=lora)
    before = _snapshot(trainer.model.policy)
    trainer.train()
    for name, param in trainer.model.policy.named_parameters():
        changed = not torch.equal(param, before[name])
        if "lora_B" in name:
            assert changed, name
        elif "lora_" not in name:
            assert not changed, f"base weight {name} changed"
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_sequence_classification_reward_model_runs(tokenizer, tmp_path):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    reward = AutoModelForSequenceClassification.from_config(config)
    sft = tiny_causal_lm(tokenizer, seed=1)
    trainer = SRPPOTrainer(
        args=_args(tmp_path),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        ref_model=sft,
        reward_model=reward,
        train_dataset=_prompts(),
    )
    trainer.train()
    assert "objective/scores" in trainer.state.log_history[0]
    assert "objective/coherent_reward" not in trainer.state.log_history[0]


def test_score_lands_on_the_eos_token_not_on_padding(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, kl_coef=0.0, whiten_advantages=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response = torch.tensor([[7, 8, eos, pad, pad], [7, eos, pad, pad, pad], [7, 8, 9, 10, 11]])
    mask, has_stop = response_mask_after_stop(response, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_stop.tolist() == [True, True, False]
    zeros = torch.zeros(3, 5)
    scored = RolloutBuffer(
        query=torch.full((3, 1), 7), query_mask=torch.ones(3, 1, dtype=torch.long), response=response,
        response_mask=mask, scores=torch.tensor([2.0, -1.0, 0.5]), token_scores=zeros,
        logprobs=zeros, ref_logprobs=zeros, values=zeros, has_stop=has_stop,
    )  # fmt: skip
    rewards = trainer.compute_advantages(scored).rewards
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 1], expected[2, 4] = 2.0, -1.0, 0.5
    assert torch.equal(rewards, expected)


def test_nothing_after_the_first_eos_counts_even_when_pad_equals_eos():
    eos = 5
    response = torch.tensor([[3, eos, 4, eos, eos]])  # pad == eos: only the first EOS ends the response
    mask, has_stop = response_mask_after_stop(response, eos)
    assert mask.tolist() == [[1, 1, 0, 0, 0]] and has_stop.item()


def test_without_a_stop_token_every_response_token_counts():
    response = torch.tensor([[5, 2, 7], [2, 2, 2]])
    mask, has_stop = response_mask_after_stop(response, None)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]] and has_stop.tolist() == [False, False]


def test_missing_eos_penalty_applies_only_to_truncated_responses(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, missing_eos_penalty=3.0, response_length=4)
    batch = trainer._collate([trainer.train_dataset[i] for i in range(4)])
    rollouts = trainer.generate_rollouts(batch)
    rollouts.has_stop = torch.tensor([True, False, True, False])
    scored = trainer.score_rollouts(rollouts)
    assert torch.allclose(scored.coherent_reward - scored.scores, torch.tensor([0.0, 3.0, 0.0, 3.0]))


def test_shared_sft_forward_serves_kl_and_reward(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    assert trainer.ref_is_reward_sft
    calls = []
    sft = trainer.reward_model.sft_model
    handle = sft.register_forward_hook(lambda *a: calls.append(1))
    batch = trainer._collate([trainer.train_dataset[i] for i in range(4)])
    scored = trainer.score_rollouts(trainer.generate_rollouts(batch))
    handle.remove()
    assert len(calls) == 1  # one SFT forward per chunk, for both uses
    direct = trainer.reward_model.sft_log_probs(
        torch.cat([scored.query, scored.response], 1),
        torch.cat([scored.query_mask, scored.response_mask], 1),
        torch.cat([torch.zeros_like(scored.query_mask), scored.response_mask], 1),
    )[:, scored.query.shape[1] :]
    assert torch.allclose(scored.ref_logprobs, direct * scored.response_mask)


def test_save_model_writes_policy_and_tokenizer_in_safetensors(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, save_value_model=True)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "srppo_config.json", "value_model"} <= saved
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in saved)


def test_evaluate_reports_reward_length_and_eos_rate(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    metrics = trainer.evaluate(_prompts(4))
    for key in (
        "eval_objective/scores",
        "eval_completions/mean_length",
        "eval_completions/eos_rate",
        "eval_objective/kl",
    ):
        assert key in metrics


# ---------------------------------------------------------------- bad input: one clear sentence, before compute


def test_mismatched_vocabularies_are_refused(tokenizer, tmp_path):
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    reward = CoherentRewardModel(sft, pt)
    policy = tiny_causal_lm(tokenizer, seed=1)
    policy.resize_token_embeddings(len(tokenizer) + 16)
    with pytest.raises(ValueError, match="vocabulary"):
        SRPPOTrainer(args=_args(tmp_path), processing_class=tokenizer, model=policy, reward_model=reward,
                     train_dataset=_prompts())  # fmt: skip


def test_unusable_reward_model_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="CoherentRewardModel"):
        SRPPOTrainer(args=_args(tmp_path), processing_class=tokenizer, model=tiny_causal_lm(tokenizer),
                     reward_model=torch.nn.Linear(2, 2), train_dataset=_prompts())  # fmt: skip


def test_dataset_without_prompt_column_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`prompt` column"):
        _trainer_with_data(tokenizer, tmp_path, Dataset.from_dict({"text": ["hello"]}))


def test_prompt_longer_than_max_prompt_length_is_refused(tokenizer, tmp_path):
    data = Dataset.from_dict({"prompt": ["short", "word " * 300]})
    with pytest.raises(ValueError, match="max_prompt_length"):
        _trainer_with_data(tokenizer, tmp_path, data)


def _trainer_with_data(tokenizer, tmp_path, data):
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    return SRPPOTrainer(args=_args(tmp_path), processing_class=tokenizer, model=tiny_causal_lm(tokenizer, seed=1),
                        reward_model=reward, train_dataset=data)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(reward_granularity="word"), "reward_granularity"),
        (dict(response_length=0), "response_length"),
        (dict(rollout_batch_size=10), "divisible"),
        (dict(rollout_batch_size=8, num_mini_batches=4), "not both"),  # 8 / 4 per step gives 2, not 4
        (dict(normalize_reward=True, reward_granularity="token"), "normalize_reward"),
    ],
)
def test_config_checks(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_config_expresses_the_papers_rollout_and_train_batch(tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=16, rollout_batch_size=1024)
    assert (args.mini_batch_size, args.num_mini_batches, args.steps_per_rollout) == (128, 8, 8)


def test_policy_that_is_the_frozen_sft_object_is_refused(tokenizer, tmp_path):
    sft = tiny_causal_lm(tokenizer, seed=1)
    reward = CoherentRewardModel(sft, tiny_causal_lm(tokenizer, seed=2))
    with pytest.raises(ValueError, match="copy"):
        SRPPOTrainer(args=_args(tmp_path), processing_class=tokenizer, model=sft, reward_model=reward,
                     train_dataset=_prompts())  # fmt: skip


def test_sequence_classifier_with_another_vocabulary_is_refused(tokenizer, tmp_path):
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    reward = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match="same tokenizer"):
        SRPPOTrainer(args=_args(tmp_path), processing_class=tokenizer, model=tiny_causal_lm(tokenizer, seed=1),
                     ref_model=tiny_causal_lm(tokenizer, seed=1), reward_model=reward, train_dataset=_prompts())  # fmt: skip


# ---------------------------------------------------------------------------------------------- the critic's start


def _buffers_of(trainer, on_buffer=None):
    """Records every rollout buffer `trainer` makes (and calls `on_buffer(buffer)` right after, before any update)."""
    buffers, original = [], trainer.make_rollout_buffer

    def spy(batch):
        buffer = original(batch)
        buffers.append(buffer)
        if on_buffer is not None:
            on_buffer(buffer)
        return buffer

    trainer.make_rollout_buffer = spy
    return buffers


def test_normalize_reward_uses_the_running_moments_of_every_score_so_far(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, normalize_reward=True, max_steps=3)  # 3 buffers of 4 responses
    buffers = _buffers_of(trainer)
    trainer.train()
    scores = [b.scores.double() for b in buffers]
    for k, buffer in enumerate(buffers):
        seen = torch.cat(scores[: k + 1])  # this buffer's scores included
        expected = (scores[k] - seen.mean()) / (seen.var() + 1e-8).sqrt()  # unbiased variance, as OpenRLHF's std
        torch.testing.assert_close(buffer.normalized_scores.double(), expected, rtol=1e-5, atol=1e-5)
        # The normalised score, not the raw one, is what the KL-shaped rewards carry.
        kl_part = -trainer.args.kl_coef * buffer.kl.sum(-1)
        torch.testing.assert_close(buffer.rewards.sum(-1), buffer.normalized_scores + kl_part)
    assert trainer._reward_moments[0].item() == 12
    logged = [h["reward_norm/std"] for h in trainer.state.log_history if "reward_norm/std" in h]
    assert logged[-1] == pytest.approx(torch.cat(scores).std().item(), rel=1e-5)
    # Evaluation normalises by the training statistics without updating them.
    metrics = trainer.evaluate(eval_dataset=_prompts(4))
    assert "eval_objective/normalized_scores" in metrics
    assert trainer._reward_moments[0].item() == 12


def _values_now(trainer, buffer):
    """The critic's values on the buffer's responses, from a fresh forward (the weights as they are now)."""
    with torch.no_grad():
        _, values = trainer._policy_and_values(
            trainer.model, buffer.query, buffer.query_mask, buffer.response, buffer.response_mask
        )
    return values


@pytest.mark.parametrize(
    "value_bias_init, normalize_reward",
    [(True, False), (True, True), ("lora", False), (False, False)],  # the last: what is seen without the option
    ids=["init", "init-normalized", "init-lora-critic", "no-init"],
)
def test_value_bias_init_starts_the_critic_at_the_first_buffers_mean_return(
    tokenizer, tmp_path, value_bias_init, normalize_reward
):
    # With a LoRA policy the critic gets an adapter and a trained copy of its head (PEFT's `modules_to_save`).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(
        tokenizer,
        tmp_path,
        value_bias_init=bool(value_bias_init),
        normalize_reward=normalize_reward,
        lam=0.95,
        peft_config=lora if value_bias_init == "lora" else None,
    )
    seen = []
    mask_mean = ppo_math.masked_mean

    def check(buffer):  # right after the first buffer is made, before any critic update
        mask = buffer.response_mask
        seen.append((mask_mean(_values_now(trainer, buffer), mask).item(), mask_mean(buffer.returns, mask).item()))
        if buffer.first_forward is not None:  # the first micro-batch's kept forward has the new bias too
            micro = len(buffer.first_forward[1])
            torch.testing.assert_close(
                buffer.first_forward[1].detach() * mask[:micro], _values_now(trainer, buffer)[:micro] * mask[:micro]
            )

    buffers = _buffers_of(trainer, on_buffer=lambda b: check(b) if not seen else None)
    trainer.train()
    (mean_value, mean_return) = seen[0]
    if value_bias_init:
        assert mean_value == pytest.approx(mean_return, abs=1e-4)
        assert mask_mean(buffers[0].values, buffers[0].response_mask).item() == pytest.approx(mean_return, abs=1e-4)
        assert trainer._value_bias_initialized
    else:
        assert abs(mean_value - mean_return) > 1e-2  # a fresh head starts near 0, far from the returns


def test_models_are_unwrapped_once_per_wrapper_object(tokenizer, tmp_path, monkeypatch):
    """accelerate walks every submodule at each `unwrap_model`: the trainer remembers the result per object."""
    trainer = _trainer(tokenizer, tmp_path)
    calls = []
    original = trainer.accelerator.unwrap_model
    monkeypatch.setattr(
        trainer.accelerator, "unwrap_model", lambda m, *a, **k: calls.append(m) or original(m, *a, **k)
    )
    first = trainer._scored_models()
    assert first and all(a is b for a, b in zip(first, [original(m) for m in first]))
    made = len(calls)
    assert trainer._scored_models() == first and trainer._shared_lower_layers() is None
    assert len(calls) == made  # every object was seen by the first call
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert trainer._unwrap(other) is other and calls[-1] is other  # a new object: unwrapped afresh
