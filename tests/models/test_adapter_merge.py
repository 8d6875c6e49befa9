"""LoRA rollouts with the adapter merged into the base weights: same tokens, weights restored
bit for bit, no LoRA branch on the decoding path, and a fallback for what cannot be merged exactly.

Tiny models (srppo_trl.testing) in fp32, 8-token responses.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from srppo_trl import SRPPOTrainer
from srppo_trl.models.adapter_merge import lora_merged_for_generation, mergeable_lora_layers
from srppo_trl.models.single_base import build_single_base
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora(tokenizer, **config):
    # init_lora_weights=False: B != 0, so the adapter changes the model and a missing merge would show.
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False) | config
    return get_peft_model(tiny_causal_lm(tokenizer, seed=2), LoraConfig(**config))


def _single_base_trainer(tokenizer, tmp_path, **overrides):
    torch.manual_seed(0)
    policy, reward, critic = build_single_base(_lora(tokenizer))
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )
    return trainer, policy


def _rollout(trainer, seed=0):
    batch = trainer._collate([trainer.train_dataset[i] for i in range(8)])
    torch.manual_seed(seed)
    return trainer.generate_rollouts(batch)["response"]


def _lora_branch_calls(model):
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a: calls.append(1))
        for name, m in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    return calls, hooks


def test_single_base_rollout_merges_samples_the_same_tokens_and_restores_the_weights_exactly(tokenizer, tmp_path):
    trainer, policy = _single_base_trainer(tokenizer, tmp_path)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    calls, hooks = _lora_branch_calls(policy)
    merged = _rollout(trainer)
    for hook in hooks:
        hook.remove()
    assert not calls  # the decoding path ran the merged linears, not the LoRA branches
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed by a rollout"
    assert {name: p.requires_grad for name, p in policy.named_parameters()} == flags
    assert mergeable_lora_layers(policy)  # the LoRA branches are back on

    trainer.args.merge_adapters_for_generation = False
    calls, hooks = _lora_branch_calls(policy)
    unmerged = _rollout(trainer)
    assert calls  # now the LoRA branches run at every step
    assert torch.equal(merged, unmerged)


def test_merged_model_computes_the_adapted_function(tokenizer):
    model = _lora(tokenizer)
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        with lora_merged_for_generation(model) as merged:
            folded = model(input_ids=ids).logits
    assert merged
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=1e-5)


def test_weights_are_restored_when_generation_fails(tokenizer):
    model = _lora(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), lora_merged_for_generation(model):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mergeable_lora_layers(model)


@pytest.mark.parametrize("config", [dict(use_dora=True), dict(lora_bias=True)])
def test_what_cannot_be_merged_exactly_keeps_the_unmerged_forward(tokenizer, config):
    model = _lora(tokenizer, **config)
    assert mergeable_lora_layers(model) is None
    with lora_merged_for_generation(model) as merged:
        assert not merged


def test_a_plain_model_is_left_alone(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=1)
    with lora_merged_for_generation(model) as merged:
        assert not merged


def test_peft_policy_training_is_unchanged_by_merging(tokenizer, tmp_path):
    # Four-model mode with a PEFT policy: two updates give the same adapter weights with and without merging.
    from srppo_trl import CoherentRewardModel

    def run(merge):
        torch.manual_seed(0)
        sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
        trainer = SRPPOTrainer(
            args=tiny_srppo_config(tmp_path / str(merge), merge_adapters_for_generation=merge),
            processing_class=tokenizer,
            model=tiny_causal_lm(tokenizer, seed=1),
            reward_model=CoherentRewardModel(sft, pt),
            train_dataset=tiny_prompts(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        trainer.train()
        return {k: v.clone() for k, v in trainer.model.policy.state_dict().items() if "lora" in k}

    merged, unmerged = run(True), run(False)
    for name in unmerged:
        torch.testing.assert_close(merged[name], unmerged[name], atol=1e-6, rtol=1e-5, msg=name)
