"""SRPPOTrainer with a Python reward function (TRL's reward-function signature) instead of a reward model."""

import pytest
import torch
from datasets import Dataset

from srppo_trl import SRPPOConfig, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


def _prompts(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)]})


def _trainer(tmp_path, reward, **overrides):
    tokenizer = tiny_tokenizer()
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, response_length=8, learning_rate=1e-3,
        max_steps=2, report_to="none", save_strategy="no", seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return SRPPOTrainer(
        args=SRPPOConfig(**kwargs),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward,
        train_dataset=_prompts(),
    )


def test_reward_function_gets_trl_arguments_and_its_scores_drive_training(tmp_path):
    calls = []

    def length_reward(prompts, completions, completion_ids, **kwargs):
        calls.append((prompts, completions, completion_ids, kwargs))
        return [float(len(ids)) for ids in completion_ids]

    trainer = _trainer(tmp_path, length_reward)
    before = {n: p.detach().clone() for n, p in trainer.model.policy.named_parameters()}
    trainer.train()
    tokenizer = trainer.processing_class
    prompts, completions, completion_ids, kwargs = calls[0]
    assert len(prompts) == len(completions) == len(completion_ids) == 4
    assert "trainer_state" in kwargs
    rendered = {
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in _prompts()["prompt"]
    }
    assert set(prompts) <= rendered  # the chat prompt as the policy saw it, without padding
    eos = tokenizer.eos_token_id
    for text, ids in zip(completions, completion_ids):
        assert 1 <= len(ids) <= 8 and eos not in ids[:-1]  # up to and including the first stop token
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    logged = trainer.state.log_history[0]
    assert logged["objective/scores"] == pytest.approx(logged["completions/mean_length"])
    assert "objective/coherent_reward" not in logged
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.policy.named_parameters())


def test_reward_function_with_wrong_number_of_scores_is_refused(tmp_path):
    trainer = _trainer(tmp_path, lambda prompts, completions, **kwargs: [1.0])
    with pytest.raises(ValueError, match="returned 1 scores for 4"):
        trainer.train()


def test_a_module_that_is_not_a_reward_model_is_still_refused(tmp_path):
    with pytest.raises(ValueError, match="reward function"):
        _trainer(tmp_path, torch.nn.Linear(2, 2))
