"""The coherent reward: log p_SFT(y|x) - log p_PT(y|x), checked against a direct computation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from srppo_trl import CoherentRewardModel
from srppo_trl.models.logprobs import gather_logprobs, position_ids_from_attention_mask, sequence_logprobs
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _batch(tokenizer, prompts, responses):
    """Left-padded prompts + right-padded responses -> input_ids, attention_mask, response_mask [B, T]."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    resp = tokenizer(responses, padding=True, return_tensors="pt", add_special_tokens=False)
    tokenizer.padding_side = "left"
    input_ids = torch.cat([enc.input_ids, resp.input_ids], 1)
    attention_mask = torch.cat([enc.attention_mask, resp.attention_mask], 1)
    response_mask = torch.cat([torch.zeros_like(enc.input_ids), resp.attention_mask], 1)
    return input_ids, attention_mask, response_mask


def _direct_logprob(model, prompt_ids, response_ids):
    """log p(response | prompt) for one unpadded sequence, summed token by token from a full log-softmax."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = logits.log_softmax(-1)
    total = 0.0
    for j, token in enumerate(response_ids):
        total += logp[len(prompt_ids) + j - 1, token].item()
    return total


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reward_equals_direct_computation_and_ignores_left_padding(tokenizer, kind):
    sft, pt = tiny_causal_lm(tokenizer, kind, seed=1), tiny_causal_lm(tokenizer, kind, seed=2)
    reward = CoherentRewardModel(sft, pt)
    prompts = ["What is 2 plus 2?", "hi"]
    responses = ["The answer is 4.<|im_end|>", "hello<|im_end|>"]
    input_ids, attention_mask, response_mask = _batch(tokenizer, prompts, responses)
    scores = reward(input_ids, attention_mask, response_mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p_ids = tokenizer(prompt)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        expected = _direct_logprob(sft, p_ids, r_ids) - _direct_logprob(pt, p_ids, r_ids)
        # Row 1 is left-padded in the batch; the direct computation has no padding at all.
        assert scores[i].item() == pytest.approx(expected, abs=1e-4)


def test_token_level_sums_to_sequence_level_and_is_zero_outside_response(tokenizer):
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    input_ids, attention_mask, response_mask = _batch(tokenizer, ["a b c", "z"], ["yes<|im_end|>", "no no no"])
    per_token = reward.token_log_ratios(input_ids, attention_mask, response_mask)
    assert per_token.shape == input_ids.shape
    assert torch.all(per_token[response_mask == 0] == 0)
    assert torch.allclose(per_token.sum(-1), reward(input_ids, attention_mask, response_mask))


def test_same_model_gives_zero_reward(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=3)
    reward = CoherentRewardModel(model, model)
    input_ids, attention_mask, response_mask = _batch(tokenizer, ["q"], ["answer<|im_end|>"])
    assert torch.allclose(reward(input_ids, attention_mask, response_mask), torch.zeros(1))


def test_models_are_frozen_and_stay_in_eval_mode(tokenizer):
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    reward = CoherentRewardModel(sft, pt)
    reward.train()
    assert not any(p.requires_grad for p in reward.parameters())
    assert not sft.training and not pt.training


def test_different_vocabularies_are_refused(tokenizer):
    sft = tiny_causal_lm(tokenizer, seed=1)
    pt = tiny_causal_lm(tokenizer, seed=2)
    pt.resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        CoherentRewardModel(sft, pt)


def test_single_base_mode_uses_adapter_disabled_model_as_pretrained(tokenizer):
    base = tiny_causal_lm(tokenizer, seed=2)
    reference_pt = tiny_causal_lm(tokenizer, seed=2)  # an identical copy of the base weights
    sft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    reward = CoherentRewardModel(sft)
    assert reward.single_base
    input_ids, attention_mask, response_mask = _batch(tokenizer, ["tell me", "x y"], ["ok<|im_end|>", "sure thing"])
    single = reward(input_ids, attention_mask, response_mask)
    two_models = CoherentRewardModel(sft, reference_pt)(input_ids, attention_mask, response_mask)
    assert torch.allclose(single, two_models, atol=1e-5)
    assert not torch.allclose(single, torch.zeros_like(single))  # the adapter does change the model


def test_single_base_mode_needs_a_peft_model(tokenizer):
    with pytest.raises(ValueError, match="PEFT"):
        CoherentRewardModel(tiny_causal_lm(tokenizer))


def test_logprobs_are_fp32_for_bf16_models(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=4).to(torch.bfloat16)
    input_ids, attention_mask, response_mask = _batch(tokenizer, ["q"], ["a b<|im_end|>"])
    out = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    assert out.dtype == torch.float32


def test_gather_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    expected = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, tokens), expected, atol=1e-6)
    expected_t = (logits / 0.5).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_logprobs(logits, tokens, temperature=0.5), expected_t, atol=1e-6)


def test_position_ids_follow_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_response_at_position_zero_is_refused(tokenizer):
    model = tiny_causal_lm(tokenizer)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(model, ids, torch.ones_like(ids), torch.ones_like(ids))
