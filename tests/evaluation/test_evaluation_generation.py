"""Evaluation generates the way the rollouts do: the reward diagnostics' samples go through the trainer's
`rollout.sample_responses` with every sampling field set explicitly, and the greedy answers (`greedy_decode`, rows
leaving the batch as they end) are token for token those of `model.generate(do_sample=False)` there."""

import pytest
import torch

from srppo_trl.evaluation import generation
from srppo_trl.evaluation.generation import generate_in_batches, generate_responses, left_padded
from srppo_trl.evaluation.reward_diagnostics import sample_responses as diagnostic_samples
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer.rollout import NEUTRAL_SAMPLING_FIELDS


PROMPTS = ["What is 12 plus 7?", "a", "Tell me a long story about a cat and a dog.", "List three fruits."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def batches(monkeypatch):
    """Every call of the rollouts' `sample_responses` made through the evaluation loop: (batch size, config)."""
    calls = []
    real = generation.sample_responses

    def spy(model, queries, query_masks, generation_config, chunk_size, pad_token_id, **kwargs):
        calls.append((queries.shape[0], generation_config))
        return real(model, queries, query_masks, generation_config, chunk_size, pad_token_id, **kwargs)

    monkeypatch.setattr(generation, "sample_responses", spy)
    return calls


def _explicit_fields(config) -> dict:
    return {name: getattr(config, name) for name in NEUTRAL_SAMPLING_FIELDS if name not in ("do_sample", "top_p")}


def _generate_greedy(model, prompt_ids, max_new_tokens, eos, pad):
    """The rollouts' sampler at temperature 0, one batch, each row cut after its first EOS."""
    from srppo_trl.trainer.rollout import sample_responses

    config = generation.evaluation_generation_config(max_new_tokens, pad, eos)
    input_ids, mask = left_padded(prompt_ids, pad)
    rows = sample_responses(model, input_ids, mask, config, len(prompt_ids), pad).tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_decode_gives_the_tokens_of_generate_when_rows_end_at_different_steps(tokenizer, kind):
    from srppo_trl.evaluation.generation import greedy_decode

    model = tiny_causal_lm(tokenizer, kind, seed=3)
    prompt_ids = [[5, 6, 7, 8, 9], [7], [8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    pad = tokenizer.pad_token_id
    free = _generate_greedy(model, prompt_ids, 8, tokenizer.eos_token_id, pad)
    # Pick as "EOS" tokens that rows emit at different steps, so rows leave the batch at different times.
    stop = free[0][2] if free[0][2] != pad else free[1][1]
    expected = _generate_greedy(model, prompt_ids, 8, stop, pad)
    assert len({len(row) for row in expected}) > 1, "the test needs rows that end at different steps"
    input_ids, mask = left_padded(prompt_ids, pad)
    assert greedy_decode(model, input_ids, mask, 8, stop) == expected
    no_stop = greedy_decode(model, input_ids, mask, 8, None)  # no EOS: every row runs the whole budget
    assert all(len(row) == 8 and row[: len(f)] == f for row, f in zip(no_stop, free))


def test_greedy_answers_do_not_depend_on_the_batch_size_and_restore_the_mode(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=4)
    model.train()
    answers = {
        size: generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=size, show_progress=False)
        for size in (1, 3, 64)
    }
    assert answers[1] == answers[3] == answers[64] and model.training


def test_greedy_answers_ignore_the_checkpoints_generation_settings(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=3)
    plain = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, show_progress=False)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.max_new_tokens = 1
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, show_progress=False) == plain


def test_greedy_decode_refuses_an_empty_budget(tokenizer):
    from srppo_trl.evaluation.generation import greedy_decode

    model = tiny_causal_lm(tokenizer, seed=3)
    input_ids, mask = left_padded([[5, 6]], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, input_ids, mask, 0, tokenizer.eos_token_id)


def test_diagnostic_samples_go_through_the_rollouts_sampler(tokenizer, batches):
    model = tiny_causal_lm(tokenizer, seed=3)
    diagnostic_samples(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=0.7, batch_size=2, show_progress=False)
    assert [size for size, _ in batches] == [2, 2]
    config = batches[0][1]
    assert config.do_sample is True and config.temperature == 0.7 and config.top_p == 1.0 and config.top_k == 0
    neutral = {k: v for k, v in NEUTRAL_SAMPLING_FIELDS.items() if k not in ("do_sample", "top_p")}
    assert _explicit_fields(config) == neutral


def test_seeded_samples_are_those_of_the_rollouts_sampler_batch_by_batch(tokenizer):
    # Input order, left padding per batch, one seed before the first batch: what the diagnostics always sampled.
    from srppo_trl.evaluation.reward_diagnostics import _prompt_token_ids
    from srppo_trl.trainer.rollout import rollout_generation_config, sample_responses

    model = tiny_causal_lm(tokenizer, seed=5)
    _, ids = diagnostic_samples(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, seed=7, show_progress=False)
    prompt_ids = _prompt_token_ids(tokenizer, PROMPTS)
    config = rollout_generation_config(
        max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, stop_token_id=tokenizer.eos_token_id
    )
    expected = []
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for start in (0, 3):
            input_ids, mask = left_padded(prompt_ids[start : start + 3], tokenizer.pad_token_id)
            for row in sample_responses(model, input_ids, mask, config, 3, tokenizer.pad_token_id).tolist():
                eos = tokenizer.eos_token_id
                expected.append(row[: row.index(eos) + 1] if eos in row else row)
    assert ids == expected


def test_responses_come_back_in_input_order_cut_after_the_first_eos(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    boost = torch.zeros(model.config.vocab_size)
    boost[eos] = 1e4  # EOS is the argmax everywhere: every response is that one token
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + boost)
    config = generation.evaluation_generation_config(4, tokenizer.pad_token_id, eos)
    rows = generate_in_batches(model, [[5, 6], [7], [8, 9, 10]], config, 2, longest_first=True, show_progress=False)
    assert rows == [[eos], [eos], [eos]]


def test_left_padding(tokenizer):
    input_ids, mask = left_padded([[5, 6], [7], [8, 9, 10]], pad_token_id=0)
    assert input_ids.tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 10]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
