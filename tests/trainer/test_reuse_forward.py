"""The buffer's first micro-batch reuses its loss forward for its old log-probs and values.

Before the first optimizer step of a rollout buffer, the scoring pass of the policy and critic and the forward of the
first micro-batch's loss compute the same thing. `reuse_first_forward` (default on) runs that forward once, keeps its
graph, and uses it for both. These tests check that it saves the pass, changes nothing else (the same weights after
several buffers of several micro-batches, epochs and a critic warm-up), and gives a ratio of exactly 1 there.

Shrunk hyper-parameters as in test_trainer.py: tiny models, 8-token responses, 1e-3 learning rates.
"""

import pytest
import torch

from srppo_trl.testing import tiny_single_base_trainer, tiny_srppo_trainer, tiny_tokenizer
from srppo_trl.trainer import ppo_math


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _trainer(tokenizer, tmp_path, **overrides):
    return tiny_srppo_trainer(tokenizer, tmp_path, **overrides)


def _count_policy_forwards(trainer):
    calls = []
    original = trainer._policy_and_values

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    trainer._policy_and_values = counted
    return calls


@pytest.mark.parametrize("reuse", [True, False])
def test_a_one_micro_batch_buffer_runs_policy_and_critic_once(tokenizer, tmp_path, reuse):
    # Buffer of 4 prompts = one micro-batch, one epoch, 2 buffers.
    trainer = _trainer(tokenizer, tmp_path, reuse_first_forward=reuse, max_steps=2)
    calls = _count_policy_forwards(trainer)
    trainer.train()
    # Per buffer: the loss forward, plus (without reuse) the scoring pass.
    assert calls == ([4, 4] if reuse else [4, 4, 4, 4])


def test_with_several_micro_batches_only_the_first_is_reused(tokenizer, tmp_path):
    # 8 prompts per buffer, micro-batches of 2, mini batches of 4 (2 accumulated micro-batches), 2 epochs: one buffer
    # of 4 optimizer steps and 8 loss forwards.
    trainer = _trainer(
        tokenizer,
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        rollout_batch_size=8,
        num_ppo_epochs=2,
        max_steps=4,
    )
    calls = _count_policy_forwards(trainer)
    trainer.train()
    # The first micro-batch's forward (2 rows) with graph, the scoring pass of the other 6 rows, 7 more loss passes.
    assert calls == [2, 6] + [2] * 7


def test_the_first_micro_batch_has_ratio_exactly_one(tokenizer, tmp_path, monkeypatch):
    seen = []
    original = ppo_math.policy_loss

    def record(logprobs, old_logprobs, advantages, mask, cliprange):
        seen.append((logprobs.detach() * mask, old_logprobs))
        return original(logprobs, old_logprobs, advantages, mask, cliprange)

    monkeypatch.setattr(ppo_math, "policy_loss", record)
    # One mini batch of 2 accumulated micro-batches of 2 rows.
    trainer = _trainer(
        tokenizer, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, rollout_batch_size=4
    )
    trainer.train()
    new, old = seen[0]  # the buffer's first micro-batch: bit for bit its own old log-probs
    assert torch.equal(new, old)
    new, old = seen[1]  # the next micro-batch: a separate (no-grad) pass, before the optimizer step
    torch.testing.assert_close(new, old, atol=1e-5, rtol=0)


@pytest.mark.parametrize("single_base", [False, True])
def test_reuse_changes_nothing_but_the_number_of_passes(tokenizer, tmp_path, single_base):
    # Several micro-batches, mini batches, epochs, a critic warm-up buffer and activation checkpointing: the weights
    # after 3 buffers equal those without reuse (fp32 rounding: whitening sums the rows in another order).
    settings = dict(
        per_device_train_batch_size=2,
        rollout_batch_size=4,
        num_ppo_epochs=2,
        max_steps=12,
        critic_warmup_steps=1,
        activation_checkpointing=True,
    )

    def run(reuse):
        torch.manual_seed(0)
        if single_base:
            trainer = tiny_single_base_trainer(tokenizer, tmp_path / str(reuse), reuse_first_forward=reuse, **settings)
        else:
            trainer = _trainer(tokenizer, tmp_path / str(reuse), reuse_first_forward=reuse, **settings)
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    with_reuse, without = run(True), run(False)
    assert with_reuse.keys() == without.keys()
    for name in without:
        torch.testing.assert_close(with_reuse[name], without[name], atol=1e-5, rtol=1e-4, msg=name)
