"""`build_single_base(..., critic_top_layers=k)`: a critic that trains only its top k layers, and the lower layers it
shares with the SFT scoring pass (`srppo_trl.models.shared_lower_layers.SharedLowerLayers`), computed once per rollout row.

Tiny 4-layer Llama models; the critic trains its top 2 layers.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from srppo_trl import SRPPOTrainer
from srppo_trl.models.logprobs import sequence_logprobs
from srppo_trl.models.modeling import token_values
from srppo_trl.models.single_base import build_single_base
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


LAYERS, TOP = 4, 2


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _sft_peft(tokenizer, **lora):
    base = tiny_causal_lm(tokenizer, "llama", seed=2, num_layers=LAYERS)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    sft = get_peft_model(base, LoraConfig(**{**config, **lora}))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return sft


def _batch(tokenizer, n=3, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (n, 12))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # a left-padded row
    response = torch.zeros_like(ids)
    response[:, 7:] = 1
    return ids, attention, response


def _sft_hidden(reward, ids, attention):
    with reward.sft_context() as model:
        return model.get_base_model().model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state


def _critic_hidden(critic, ids, attention):
    with critic.critic_adapter() as model:
        return model.get_base_model().model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state


def _mutate_critic_adapter(critic):
    with torch.no_grad():
        for name, param in critic.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)


def test_the_critic_trains_only_its_top_layers_and_starts_at_the_sft_backbone(tokenizer):
    policy, reward, critic = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    adapter = [name for name, _ in critic.named_parameters() if not name.startswith("score.")]
    layers = {int(name.split("__layers__")[1].split("__")[0]) for name in adapter}
    assert layers == set(range(LAYERS - TOP, LAYERS))
    assert all(p.requires_grad for p in critic.parameters())
    ids, attention, _ = _batch(tokenizer)
    # Zero-initialised delta on top of the SFT adapter: the critic's backbone is exactly the SFT backbone.
    torch.testing.assert_close(
        _critic_hidden(critic, ids, attention), _sft_hidden(reward, ids, attention), rtol=0, atol=0
    )
    _mutate_critic_adapter(critic)
    critic_hidden = _critic_hidden(critic, ids, attention)
    assert not torch.allclose(critic_hidden, _sft_hidden(reward, ids, attention))
    # The policy stays the resting adapter, and the trainable set is the policy and critic adapters.
    assert policy.active_adapter == "default" and policy.base_model.active_adapter == "default"
    assert all(".default." in n or ".critic." in n for n, p in policy.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("bad", [0, LAYERS, -1, True, 2.0])
def test_bad_critic_top_layers_are_refused(tokenizer, bad):
    with pytest.raises(ValueError, match="critic_top_layers must be an integer from 1 to 3"):
        build_single_base(_sft_peft(tokenizer), critic_top_layers=bad)


def test_an_sft_adapter_with_modules_to_save_is_refused(tokenizer):
    with pytest.raises(ValueError, match="plain LoRA SFT adapter"):
        build_single_base(_sft_peft(tokenizer, modules_to_save=["lm_head"]), critic_top_layers=TOP)


def test_cached_lower_layers_give_the_same_reward_and_values_and_gradients(tokenizer):
    policy, reward, critic = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    _mutate_critic_adapter(critic)
    shared = critic.shared_lower_layers
    ids, attention, response = _batch(tokenizer)
    positions = torch.clamp(attention.cumsum(-1) - 1, min=0)

    def values_and_grads():
        critic.zero_grad()
        values = token_values(critic, ids, attention, positions)
        values.sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}

    expected_sft = reward.sft_log_probs(ids, attention, response)
    expected_values, expected_grads = values_and_grads()
    policy_logprobs = sequence_logprobs(policy, ids, attention, response)

    with shared.installed():
        values, grads = values_and_grads()  # a miss: runs every layer and fills the cache
        assert (shared.misses, shared.hits, len(shared)) == (1, 0, 3)
        sft = reward.sft_log_probs(ids, attention, response)  # a hit: only the top layers run
        values_again, grads_again = values_and_grads()  # a hit, with a backward through the top layers
        assert shared.hits == 2
        # The policy's adapter runs in the lower layers, and PT has the adapters off: neither is eligible.
        torch.testing.assert_close(
            sequence_logprobs(policy, ids, attention, response), policy_logprobs, rtol=0, atol=0
        )
        reward.base_log_probs(ids, attention, response)
        assert (shared.misses, shared.hits) == (1, 2)
    torch.testing.assert_close(sft, expected_sft, rtol=0, atol=0)
    for got, got_grads in ((values, grads), (values_again, grads_again)):
        torch.testing.assert_close(got, expected_values, rtol=0, atol=0)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0)
    # Uninstalled: the backbone and its layers have their own forward back.
    backbone = policy.get_base_model().model
    assert "forward" not in backbone.__dict__ and all("forward" not in layer.__dict__ for layer in backbone.layers)


def test_a_batch_with_an_uncached_row_runs_in_full_and_the_stubs_go_after_an_error(tokenizer):
    _, reward, critic = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    shared = critic.shared_lower_layers
    ids, attention, response = _batch(tokenizer)
    other, _, _ = _batch(tokenizer, seed=1)
    mixed = torch.cat([ids[:2], other[:1]])
    expected = reward.sft_log_probs(mixed, attention, response)
    with shared.installed():
        reward.sft_log_probs(ids[:2], attention[:2], response[:2])
        assert torch.equal(reward.sft_log_probs(mixed, attention, response), expected)
        assert (shared.misses, shared.hits, len(shared)) == (2, 0, 3)
        # An error inside a hit's forward (a top layer fails) leaves no stub behind.
        top = critic.peft_model.get_base_model().model.layers[-1]
        hook = top.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            reward.sft_log_probs(mixed, attention, response)
        hook.remove()
        assert shared.hits == 1
    backbone = critic.peft_model.get_base_model().model
    assert all("forward" not in layer.__dict__ for layer in backbone.layers)
    assert torch.equal(reward.sft_log_probs(mixed, attention, response), expected)
    shared.clear()
    assert len(shared) == 0


def _trainer(tokenizer, tmp_path, share: bool, **overrides):
    policy, reward, critic = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    if not share:
        critic.shared_lower_layers = None
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )
    return trainer, policy, critic


@pytest.mark.parametrize("overrides", [{}, {"local_rollout_forward_batch_size": 2, "num_ppo_epochs": 2}])
def test_training_with_the_shared_lower_layers_matches_training_without(tokenizer, tmp_path, overrides):
    runs = []
    for share in (True, False):
        torch.manual_seed(0)
        trainer, policy, critic = _trainer(tokenizer, tmp_path / str(share), share, **overrides)
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        trainer.train()
        runs.append((trainer, policy, critic, before))
    (trainer, policy, critic, before), (_, plain_policy, plain_critic, _) = runs
    shared = critic.shared_lower_layers
    assert shared.hits > 0 and len(shared) == 0  # used, and emptied after the last buffer
    for name, param in policy.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (".default." in name or ".critic." in name), name  # base and sft adapter frozen
    plain = dict(plain_policy.named_parameters())
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param, plain[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(critic.score.weight, plain_critic.score.weight, rtol=1e-5, atol=1e-6)
    assert trainer.state.log_history[0]["objective/scores"] == pytest.approx(
        runs[1][0].state.log_history[0]["objective/scores"], rel=1e-5
    )


def test_the_top_layer_critic_saves_and_reloads(tokenizer, tmp_path):
    _, _, critic = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    _mutate_critic_adapter(critic)
    ids, attention, _ = _batch(tokenizer)
    values = critic(ids, attention).logits
    critic.save_pretrained(tmp_path / "critic")
    _, _, fresh = build_single_base(_sft_peft(tokenizer), critic_top_layers=TOP)
    from srppo_trl.trainer.checkpointing import _load_pretrained_weights

    _load_pretrained_weights(fresh, tmp_path / "critic")
    torch.testing.assert_close(fresh(ids, attention).logits, values)
    # A critic built differently is refused with the reason.
    _, _, every_layer = build_single_base(_sft_peft(tokenizer))
    with pytest.raises(
        ValueError, match="saved with critic_top_layers=2 but this one was built with critic_top_layers=None"
    ):
        _load_pretrained_weights(every_layer, tmp_path / "critic")
