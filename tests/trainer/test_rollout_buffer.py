"""The rollout buffer's route is explicit: `make_rollout_buffer` returns a `RolloutBuffer` whose fields have their
documented shapes, each phase takes and returns the buffer, and the first micro-batch's kept forward travels in it.

Shrunk hyper-parameters as in test_trainer.py: tiny models, 8-token responses, buffers of 4 or 8 prompts.
"""

import dataclasses

import pytest
import torch

from srppo_trl.testing import tiny_srppo_trainer, tiny_tokenizer
from srppo_trl.trainer.rollout import RolloutBuffer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _trainer(tokenizer, tmp_path, **overrides):
    return tiny_srppo_trainer(tokenizer, tmp_path, **overrides)


def _batch(trainer, size):
    return trainer._collate([trainer.train_dataset[i] for i in range(size)])


def _buffer(trainer, batch, **kwargs):
    torch.manual_seed(1)  # the same responses and micro-batch shuffles for every call
    return trainer.make_rollout_buffer(batch, **kwargs)


def test_make_rollout_buffer_returns_a_rollout_buffer_with_the_documented_shapes(tokenizer, tmp_path):
    # 8 prompts, micro-batches of 2, 2 PPO epochs.
    trainer = _trainer(tokenizer, tmp_path, per_device_train_batch_size=2, rollout_batch_size=8, num_ppo_epochs=2)
    batch = _batch(trainer, 8)
    buffer = _buffer(trainer, batch)
    assert isinstance(buffer, RolloutBuffer)
    rows, prompt = batch["input_ids"].shape
    width = buffer.response.shape[1]
    assert 0 < width <= trainer.args.response_length
    for name in ("query", "query_mask"):
        assert getattr(buffer, name).shape == (rows, prompt), name
    for name in ("response", "response_mask", "logprobs", "values", "ref_logprobs", "token_scores", "kl", "rewards"):
        assert getattr(buffer, name).shape == (rows, width), name
    for name in ("advantages", "returns"):
        assert getattr(buffer, name).shape == (rows, width), name
    for name in ("has_stop", "eos_penalty", "scores", "coherent_reward"):
        assert getattr(buffer, name).shape == (rows,), name
    # Fields of the modes this run is not in stay empty; outside training no forward is kept.
    assert buffer.sampling_logprobs is None and buffer.normalized_scores is None and buffer.first_forward is None
    assert buffer.warmup is False
    # One shuffle of all rows per PPO epoch, in micro-batches of per_device_train_batch_size rows.
    assert len(buffer.micro_batches) == 2
    for epoch in buffer.micro_batches:
        assert [len(rows_) for rows_ in epoch] == [2, 2, 2, 2]
        assert sorted(torch.cat(epoch).tolist()) == list(range(rows))


def test_phases_take_and_return_the_buffer(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    rollouts = trainer.generate_rollouts(_batch(trainer, 4))
    assert isinstance(rollouts, RolloutBuffer) and rollouts.logprobs is None
    scored = trainer.score_rollouts(rollouts)
    assert scored is not rollouts and rollouts.logprobs is None  # a new buffer; the tensors of phase 1 are shared
    assert scored.response is rollouts.response and scored.logprobs is not None and scored.advantages is None
    done = trainer.compute_advantages(scored)
    assert done.advantages is not None and scored.advantages is None


def test_scoring_takes_the_first_rows_from_the_buffers_kept_forward(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    rollouts = trainer.generate_rollouts(_batch(trainer, 4))
    plain = trainer.score_rollouts(rollouts)
    # Marked outputs for rows [0, 2): scoring uses them instead of its own pass, and scores rows 2, 3 itself.
    marked = (torch.full((2, rollouts.response.shape[1]), -7.0), torch.full((2, rollouts.response.shape[1]), 3.0))
    kept = dataclasses.replace(rollouts, first_forward=(*marked, torch.zeros(2, rollouts.response.shape[1])))
    scored = trainer.score_rollouts(kept)
    mask = rollouts.response_mask.float()
    torch.testing.assert_close(scored.logprobs[:2], -7.0 * mask[:2])
    torch.testing.assert_close(scored.values[:2], 3.0 * mask[:2])
    torch.testing.assert_close(scored.logprobs[2:], plain.logprobs[2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scored.values[2:], plain.values[2:], atol=1e-5, rtol=1e-5)


def test_a_kept_first_forward_changes_no_micro_batch(tokenizer, tmp_path):
    # 8 prompts, micro-batches of 2, 2 PPO epochs: the buffer made with the first micro-batch's forward kept holds,
    # in every micro-batch of every epoch, the same rollouts, old log-probs, values and advantages as the one without.
    trainer = _trainer(tokenizer, tmp_path, per_device_train_batch_size=2, rollout_batch_size=8, num_ppo_epochs=2)
    batch = _batch(trainer, 8)
    plain, kept = _buffer(trainer, batch, reuse_first_forward=False), _buffer(trainer, batch, reuse_first_forward=True)
    assert plain.first_forward is None
    logprobs, values, entropy = kept.first_forward
    assert logprobs.shape == values.shape == entropy.shape == (2, kept.response.shape[1])
    assert logprobs.requires_grad and values.requires_grad  # the loss backpropagates through it
    assert kept.micro_batches[0][0].tolist() == [0, 1]  # the kept forward's rows come first
    mask = kept.response_mask[:2].float()
    assert torch.equal(logprobs.detach() * mask, kept.logprobs[:2])
    assert torch.equal(values.detach() * mask, kept.values[:2])
    for epoch_plain, epoch_kept in zip(plain.micro_batches, kept.micro_batches, strict=True):
        for rows_plain, rows_kept in zip(epoch_plain, epoch_kept, strict=True):
            assert torch.equal(plain.response[rows_plain], kept.response[rows_kept])
            for name in ("logprobs", "values", "advantages", "returns"):
                torch.testing.assert_close(
                    getattr(plain, name)[rows_plain], getattr(kept, name)[rows_kept], atol=1e-5, rtol=1e-5
                )


def test_training_hands_the_kept_forward_to_the_first_loss_only(tokenizer, tmp_path):
    # 4 prompts in micro-batches of 2: one kept forward per buffer, used by the first micro-batch's loss alone.
    trainer = _trainer(tokenizer, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    seen, original = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append(inputs["first_forward"] is not None)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert seen == [True, False, True, False]
    assert trainer._buffer.first_forward is None  # handed out, not kept alive by the buffer
    for name in ("_first_outputs", "_reuse_next_buffer", "_reused_forward"):  # the buffer carries it instead
        assert not hasattr(trainer, name), name


def test_a_buffer_made_after_training_keeps_no_forward(tokenizer, tmp_path):
    # After train() the micro-step counter may sit at a buffer's first micro-step; a buffer made by hand then (the
    # model in eval mode) must not keep a forward with its graph that no loss will consume.
    trainer = _trainer(tokenizer, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    trainer.train()
    trainer.model.eval()
    trainer._step = 0
    assert _buffer(trainer, _batch(trainer, 4)).first_forward is None


def test_dict_style_reads_of_the_buffer_still_work(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    buffer = _buffer(trainer, _batch(trainer, 4))
    assert buffer["scores"] is buffer.scores and "scores" in buffer
    assert "normalized_scores" not in buffer and buffer.get("normalized_scores") is None  # not filled in this run
    assert "no_such_field" not in buffer
    with pytest.raises(KeyError, match="normalized_scores"):
        buffer["normalized_scores"]
