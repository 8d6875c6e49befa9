"""Rollout token sampling by inverse transform (`trainer.sampling`): the index picked for hand-set uniforms, the
frequencies of many draws, the same distribution as transformers' `torch.multinomial` through `generate` (with
temperature, top-k and top-p), the refusals, and the trainer's `rollout_sampler` setting.

Tiny models (srppo_trl.testing); the statistical checks use fixed seeds and bounds of several standard deviations.
"""

import math

import pytest
import torch
from transformers import GenerationConfig

from srppo_trl import SRPPOConfig
from srppo_trl.testing import tiny_causal_lm, tiny_srppo_trainer, tiny_tokenizer
from srppo_trl.trainer.rollout import rollout_generation_config, sample_responses
from srppo_trl.trainer.sampling import InverseCDFSampler, inverse_cdf_generation, inverse_cdf_sample


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------- the pure function


@pytest.mark.parametrize(
    "u, expected",
    [(0.0, 0), (0.1, 0), (0.2499, 0), (0.25, 2), (0.5, 2), (0.7499, 2), (0.75, 3), (0.99, 3), (0.999999, 3)],
)
def test_inverse_cdf_picks_the_first_index_whose_cumulative_sum_exceeds_u(u, expected):
    # cumulative sums 0.25, 0.25, 0.75, 1.0 (exact in binary): index 1 has probability 0 and is passed over even at
    # its boundary (u=0.25)
    weights = torch.tensor([[0.25, 0.0, 0.5, 0.25]])
    assert inverse_cdf_sample(weights, torch.tensor([u])).item() == expected
    assert inverse_cdf_sample(weights * 7.0, torch.tensor([u])).item() == expected  # normalisation is not needed


def test_leading_zero_weights_are_never_drawn_and_rows_are_independent():
    weights = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert inverse_cdf_sample(weights, torch.tensor([0.0, 0.999, 0.0])).tolist() == [2, 0, 3]
    assert inverse_cdf_sample(weights, torch.tensor([0.5, 0.5, 0.5])).tolist() == [3, 0, 3]


def test_draw_frequencies_match_the_probabilities_including_small_ones():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, generator=generator) * 2.5, -1)
    probs[7] = 0.0  # a token that must never come out
    n = 400_000
    picks = inverse_cdf_sample(probs.expand(n, -1), torch.rand(n, generator=generator, dtype=torch.float64))
    freq = torch.bincount(picks, minlength=40).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert freq[7] == 0
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all()


# ---------------------------------------------------------------------------------------------- the logits processor


def test_sampler_returns_scores_whose_argmax_is_the_drawn_token_and_records_its_logprob():
    scores = torch.randn(6, 30) * 3
    sampler = InverseCDFSampler(record_logprobs=True)
    torch.manual_seed(3)
    out = sampler(None, scores.clone())
    token = out.argmax(-1)
    assert torch.isinf(out).sum(-1).tolist() == [29] * 6  # one finite entry per row
    torch.testing.assert_close(sampler.logprobs[0], torch.log_softmax(scores, -1).gather(-1, token[:, None])[:, 0])
    # the same draw from the same uniforms: one float64 uniform per row, in row order
    torch.manual_seed(3)
    uniform = torch.rand(6, dtype=torch.float64)
    assert torch.equal(token, inverse_cdf_sample(torch.softmax(scores, -1), uniform))


@pytest.mark.parametrize("bad", ["nan", "all_inf"])
def test_scores_no_token_can_be_drawn_from_fail_with_one_clear_error(bad):
    scores = torch.randn(3, 10)
    if bad == "nan":
        scores[1, 4] = float("nan")
    else:
        scores[2] = -torch.inf
    with pytest.raises(ValueError, match="NaN or are all -inf"):
        InverseCDFSampler()(None, scores)


@pytest.mark.parametrize(
    "field, value",
    [
        ("typical_p", 0.9),
        ("min_p", 0.1),
        ("epsilon_cutoff", 0.01),
        ("num_beams", 2),
        ("do_sample", False),
        ("penalty_alpha", 0.6),  # contrastive search
        ("num_return_sequences", 2),
        ("prompt_lookup_num_tokens", 3),  # assisted decoding
        ("top_k", None),  # transformers' default 50, not "off"
    ],
)
def test_settings_inverse_cdf_sampling_cannot_honour_are_refused(field, value):
    config = rollout_generation_config(max_new_tokens=4, pad_token_id=0)
    setattr(config, field, value)
    with pytest.raises(ValueError, match="multinomial|top_k set explicitly"):
        inverse_cdf_generation(config)


def test_the_greedy_config_carries_temperature_top_k_and_top_p_as_transformers_warpers():
    config = rollout_generation_config(max_new_tokens=4, temperature=0.5, top_k=7, top_p=0.9, pad_token_id=0)
    greedy, processors, sampler = inverse_cdf_generation(config)
    assert greedy.do_sample is False and config.do_sample is True  # the caller's config is left alone
    names = [type(p).__name__ for p in processors]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "InverseCDFSampler"]
    assert processors[-1] is sampler


# ---------------------------------------------------------------------------------------------- through `generate`


def _peaked(model):
    """A tiny model whose next-token distribution is far from flat (logits' spread ~2, a few tokens above 5%), so that
    a sampler that misplaced an index or ignored the temperature would show in the frequencies."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _first_token_distribution(model, input_ids, temperature, top_k, top_p):
    """The exact distribution of the first sampled token, as transformers' warpers define it."""
    with torch.no_grad():
        logits = model(input_ids=input_ids[:1]).logits[0, -1].float() / temperature
    probs = torch.softmax(logits, -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= logits >= logits.topk(top_k).values[-1]
    if top_p < 1.0:
        sorted_probs, order = torch.softmax(logits.masked_fill(~keep, -torch.inf), -1).sort()
        removed = sorted_probs.cumsum(-1) <= 1 - top_p
        removed[-1] = False
        keep[order[removed]] = False
    return torch.softmax(logits.masked_fill(~keep, -torch.inf), -1)


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 12, 1.0), (1.0, 0, 0.8)])
def test_generate_draws_the_first_token_from_the_warped_softmax(tokenizer, sampler, temperature, top_k, top_p):
    model = _peaked(tiny_causal_lm(tokenizer, seed=1).eval())
    n = 3000
    input_ids = torch.tensor([[5, 17, 33, 8]] * n)
    config = rollout_generation_config(
        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    first = sample_responses(model, input_ids, torch.ones_like(input_ids), config, n, tokenizer.pad_token_id,
                             sampler=sampler)[:, 0]  # fmt: skip
    expected = _first_token_distribution(model, input_ids, temperature, top_k, top_p).double()
    freq = torch.bincount(first, minlength=expected.numel()).double() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside top-k / top-p
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1.0 / n).all()
    # total variation of the empirical distribution: about sqrt(V / n) for a flat one, far less here
    assert 0.5 * (freq - expected).abs().sum() < math.sqrt(expected.numel() / n)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_are_the_model_logprobs_of_the_drawn_tokens(tokenizer, temperature):
    model = _peaked(tiny_causal_lm(tokenizer, seed=1).eval())
    input_ids = torch.tensor([[5, 17, 33, 8]] * 4)
    config = rollout_generation_config(max_new_tokens=6, temperature=temperature, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    response, logprobs = sample_responses(
        model, input_ids, torch.ones_like(input_ids), config, 4, tokenizer.pad_token_id, True, sampler="inverse_cdf"
    )
    with torch.no_grad():
        logits = model(input_ids=torch.cat([input_ids, response], 1)).logits[:, input_ids.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits.float() / temperature, -1).gather(-1, response[..., None])[..., 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)


def test_an_unknown_sampler_is_refused(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=1)
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="sampler='gumbel'"):
        sample_responses(model, ids, torch.ones_like(ids), GenerationConfig(), 1, 0, sampler="gumbel")


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("choice", ["inverse_cdf", "multinomial"])
def test_trainer_rollouts_use_the_configured_sampler(tokenizer, tmp_path, choice):
    trainer = tiny_srppo_trainer(
        tokenizer, tmp_path, **({} if choice == "inverse_cdf" else {"rollout_sampler": choice})
    )
    assert trainer.args.rollout_sampler == choice  # inverse_cdf is the default
    batch = trainer._collate([trainer.train_dataset[i] for i in range(4)])
    torch.manual_seed(0)
    rollout = trainer.generate_rollouts(batch).response
    policy = trainer.model.policy
    for sampler in ("inverse_cdf", "multinomial"):
        torch.manual_seed(0)
        direct = sample_responses(policy, batch["input_ids"], batch["attention_mask"], trainer.generation_config, 4,
                                  tokenizer.pad_token_id, sampler=sampler)  # fmt: skip
        assert torch.equal(rollout, direct) == (sampler == choice)


def test_an_unknown_rollout_sampler_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="rollout_sampler"):
        SRPPOConfig(output_dir=str(tmp_path), rollout_sampler="gumbel")


# ---------------------------------------------------------------------------------------------- eval mode, flat


def _flags(model):
    return [m.training for m in model.modules()]


def test_the_flat_mode_switch_sets_what_train_sets(tokenizer):
    from peft import LoraConfig, get_peft_model

    from srppo_trl.trainer.rollout import set_training_mode

    model = get_peft_model(tiny_causal_lm(tokenizer, seed=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    modules = list(model.modules())
    model.train()
    set_training_mode(model, False, modules)
    assert not any(_flags(model))
    set_training_mode(model, True, modules)
    assert all(_flags(model))
    model.eval()  # and it agrees with the recursive switch, module by module
    expected = _flags(model)
    model.train()
    set_training_mode(model, False, modules)
    assert _flags(model) == expected


def test_a_class_with_its_own_train_gets_the_recursive_switch(tokenizer):
    from srppo_trl.trainer.rollout import _plain_train, set_training_mode

    calls = []

    class Counted(torch.nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = tiny_causal_lm(tokenizer, seed=1)
    model.model.layers[0].mlp.up_proj = Counted(32, model.config.intermediate_size)
    set_training_mode(model, False, list(model.modules()))
    assert calls == [False] and not any(_flags(model))  # its own train ran, through model.train(False)
    plain = tiny_causal_lm(tokenizer, seed=1)
    assert _plain_train(plain)  # transformers' PreTrainedModel.train adds nothing without kernels
    plain.use_kernels = True  # with them it switches the kernels' mode: the recursive switch runs
    assert not _plain_train(plain)


def test_a_callers_dict_output_settings_still_give_token_ids(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=1)
    ids = torch.tensor([[5, 17, 33, 8]] * 2)
    config = rollout_generation_config(max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    config.return_dict_in_generate = config.output_scores = True
    for sampler in ("inverse_cdf", "multinomial"):
        response = sample_responses(
            model, ids, torch.ones_like(ids), config, 2, tokenizer.pad_token_id, sampler=sampler
        )
        assert response.shape == (2, 3) and response.dtype == torch.long
