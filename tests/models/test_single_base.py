"""Single-base mode (one copy of the base weights, roles as LoRA adapters) and the scoring budget of a rollout.

Shrunk as in test_trainer.py: tiny Llama models, 8-token responses, learning rate 1e-3 so that two steps move weights.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.models.single_base import POLICY_ADAPTER, SFT_ADAPTER, build_single_base
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")


def _sft_peft(tokenizer, seed=3):
    """A base model plus an SFT adapter with non-zero weights (a trained adapter's stand-in)."""
    base = tiny_causal_lm(tokenizer, "llama", seed=2)
    sft = get_peft_model(base, _lora())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return sft


_prompts = tiny_prompts  # shared with the other trainer tests (srppo_trl.testing)
_args = tiny_srppo_config


def _batch(tokenizer, n=3):
    torch.manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (n, 12))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # a left-padded row
    response = torch.zeros_like(ids)
    response[:, 7:] = 1
    return ids, attention, response


@pytest.fixture()
def saved_sft(tokenizer, tmp_path):
    sft = _sft_peft(tokenizer)
    sft.save_pretrained(tmp_path / "sft_adapter")
    return tmp_path / "sft_adapter", sft


@pytest.mark.parametrize("source", ["path", "peft_model", "base_is_peft"])
def test_roles_share_one_base_and_start_at_the_sft_model(tokenizer, saved_sft, source):
    path, sft = saved_sft
    reference_sft = copy.deepcopy(sft).merge_and_unload()  # SFT as a plain model
    reference_pt = tiny_causal_lm(tokenizer, "llama", seed=2)
    if source == "path":
        policy, reward, critic = build_single_base(tiny_causal_lm(tokenizer, "llama", seed=2), sft_adapter=path)
    elif source == "peft_model":
        policy, reward, critic = build_single_base(tiny_causal_lm(tokenizer, "llama", seed=2), sft_adapter=sft)
    else:
        policy, reward, critic = build_single_base(sft)
    assert isinstance(policy, PeftModel) and policy.active_adapter == POLICY_ADAPTER
    assert set(policy.peft_config) == {"default", "sft", "critic"}
    assert reward.single_base and reward.sft_model is policy and critic.peft_model is policy
    # One copy of the base weights: no base tensor outside the PEFT model, and the critic owns only adapter + head.
    assert all("lora_" in name for name in dict(critic.named_parameters()) if not name.startswith("score."))

    ids, attention, response = _batch(tokenizer)
    expected = CoherentRewardModel(reference_sft, reference_pt)
    torch.testing.assert_close(
        reward.token_log_ratios(ids, attention, response), expected.token_log_ratios(ids, attention, response)
    )
    assert reward(ids, attention, response).abs().sum() > 0  # SFT differs from PT
    # The policy (default adapter) starts exactly at the SFT model.
    from srppo_trl.models.logprobs import sequence_logprobs

    torch.testing.assert_close(
        sequence_logprobs(policy, ids, attention, response), expected.sft_log_probs(ids, attention, response)
    )
    # The critic's backbone is the SFT backbone.
    hidden = reference_sft.model(input_ids=ids, attention_mask=attention).last_hidden_state
    torch.testing.assert_close(critic(ids, attention).logits, critic.score(hidden))
    assert policy.active_adapter == POLICY_ADAPTER  # every switch restores the policy adapter


def test_bad_inputs_are_refused(tokenizer, saved_sft):
    path, sft = saved_sft
    with pytest.raises(ValueError, match="No SFT adapter"):
        build_single_base(tiny_causal_lm(tokenizer, "llama", seed=2))
    with pytest.raises(ValueError, match="already a PEFT model"):
        build_single_base(sft, sft_adapter=path)
    with pytest.raises(ValueError, match="pass the path of a saved PEFT adapter"):
        build_single_base(tiny_causal_lm(tokenizer, "llama", seed=2), sft_adapter=42)


def _single_base_trainer(tokenizer, tmp_path, **overrides):
    policy, reward, critic = build_single_base(_sft_peft(tokenizer))
    trainer = SRPPOTrainer(
        args=_args(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=_prompts(),
    )
    return trainer, policy, reward, critic


def test_single_base_training_moves_policy_and_critic_adapters_only_and_saves(tokenizer, tmp_path):
    trainer, policy, reward, critic = _single_base_trainer(tokenizer, tmp_path, max_steps=1)
    assert trainer.ref_is_reward_sft  # KL reference = the frozen sft adapter, one pass for KL and reward
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    head = {name: p.detach().clone() for name, p in critic.score.named_parameters()}
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n or ".critic." in n for n in trainable)
    ids, attention, response = _batch(tokenizer)
    sft_before = reward.sft_log_probs(ids, attention, response)
    pt_before = reward.base_log_probs(ids, attention, response)

    trainer.train()

    for name, param in policy.named_parameters():
        changed = not torch.equal(param, before[name])
        if ".default." in name or ".critic." in name:
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"  # base weights and the sft adapter
    assert all(not torch.equal(p, head[n]) for n, p in critic.score.named_parameters())
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.active_adapter == POLICY_ADAPTER
    torch.testing.assert_close(reward.sft_log_probs(ids, attention, response), sft_before, rtol=0, atol=0)
    torch.testing.assert_close(reward.base_log_probs(ids, attention, response), pt_before, rtol=0, atol=0)
    # The policy moved away from the (unchanged) reference.
    from srppo_trl.models.logprobs import sequence_logprobs

    assert not torch.allclose(sequence_logprobs(policy, ids, attention, response), sft_before)

    # save_model writes the policy ("default") adapter at the root, where PeftModel.from_pretrained looks.
    trainer.save_model(str(tmp_path / "final"))
    base = tiny_causal_lm(tokenizer, "llama", seed=2)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=attention).logits,
                               policy(input_ids=ids, attention_mask=attention).logits)  # fmt: skip
    # The critic saves and reloads only its adapter and head.
    critic.save_pretrained(tmp_path / "critic")
    values = critic(ids, attention).logits
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(1.0)
    from srppo_trl.trainer.checkpointing import _load_pretrained_weights

    _load_pretrained_weights(critic, tmp_path / "critic")
    torch.testing.assert_close(critic(ids, attention).logits, values)


def test_value_bias_init_shifts_the_single_base_critic_head(tokenizer, tmp_path):
    from srppo_trl.trainer.ppo_math import masked_mean

    trainer, _, _, critic = _single_base_trainer(tokenizer, tmp_path, max_steps=1, value_bias_init=True, lam=0.95)
    bias = critic.score.bias.detach().clone()
    seen, original = [], trainer.make_rollout_buffer

    def spy(batch):  # right after the buffer is made, before the critic's first update
        buffer = original(batch)
        with torch.no_grad():
            _, values = trainer._policy_and_values(
                trainer.model, buffer["query"], buffer["query_mask"], buffer["response"], buffer["response_mask"]
            )
        mask = buffer["response_mask"]
        seen.append((masked_mean(values, mask).item(), masked_mean(buffer["returns"], mask).item()))
        seen.append(critic.score.bias.detach().clone())
        return buffer

    trainer.make_rollout_buffer = spy
    trainer.train()
    (mean_value, mean_return), shifted = seen
    assert mean_value == pytest.approx(mean_return, abs=1e-4)
    assert not torch.equal(shifted, bias)


# ---------------------------------------------------------------------------------------------- scoring budget


def _record_calls(module, log, label):
    return module.register_forward_hook(lambda mod, args, kwargs, out: log.append(label), with_kwargs=True)


def test_four_model_scoring_runs_each_model_once_per_chunk(tokenizer, tmp_path):
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    trainer = SRPPOTrainer(
        args=_args(tmp_path, local_rollout_forward_batch_size=2, per_device_train_batch_size=8),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(sft, pt),
        train_dataset=_prompts(),
    )
    batch = trainer._collate([trainer.train_dataset[i] for i in range(8)])
    rollouts = trainer.generate_rollouts(batch)
    calls = []
    hooks = [
        _record_calls(trainer.model.policy, calls, "policy"),
        _record_calls(trainer.model.value_model, calls, "critic"),
        _record_calls(sft, calls, "sft"),
        _record_calls(pt, calls, "pt"),
    ]
    trainer.score_rollouts(rollouts)
    for hook in hooks:
        hook.remove()
    chunks = 8 // 2
    assert sorted(calls) == sorted(["policy", "critic", "sft", "pt"] * chunks)


def test_single_base_scoring_switches_adapters_once_per_role(tokenizer, tmp_path):
    trainer, policy, _, critic = _single_base_trainer(tokenizer, tmp_path, local_rollout_forward_batch_size=4)
    batch = trainer._collate([trainer.train_dataset[i] for i in range(8)])
    rollouts = trainer.generate_rollouts(batch)
    calls = []
    backbone = policy.get_base_model().model

    def record(module, args, kwargs, out):
        disabled = policy.base_model._disable_adapters if hasattr(policy.base_model, "_disable_adapters") else False
        lora_layer = policy.get_base_model().model.layers[0].self_attn.q_proj
        calls.append("pt" if lora_layer.disable_adapters or disabled else lora_layer.active_adapters[0])

    hook = backbone.register_forward_hook(record, with_kwargs=True)
    trainer.score_rollouts(rollouts)
    hook.remove()
    # Per chunk: the policy ("default"), its critic ("critic"), the SFT adapter once (KL and reward), PT once.
    assert calls == ["default", "critic", SFT_ADAPTER, "pt"] * 2
    assert policy.active_adapter == POLICY_ADAPTER


class _Float32LogitsSpy(TorchDispatchMode):
    """Records the shapes of fp32 tensors with a vocabulary-sized last dimension created by any op."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.shapes.append(tuple(t.shape))
        return out


def test_scoring_never_materialises_full_batch_fp32_vocabulary_logits(tokenizer, tmp_path):
    # bf16 models: the fp32 log-softmax must run one row at a time, never on the [B, K, V] logits of a chunk.
    def lm(seed):
        return tiny_causal_lm(tokenizer, seed=seed).to(torch.bfloat16)

    sft, pt = lm(1), lm(2)
    trainer = SRPPOTrainer(
        args=_args(tmp_path, local_rollout_forward_batch_size=4, per_device_train_batch_size=8),
        processing_class=tokenizer,
        model=lm(1),
        reward_model=CoherentRewardModel(sft, pt),
        train_dataset=_prompts(),
    )
    batch = trainer._collate([trainer.train_dataset[i] for i in range(8)])
    rollouts = trainer.generate_rollouts(batch)
    spy = _Float32LogitsSpy(len(tokenizer))
    with spy:
        scored = trainer.score_rollouts(rollouts)
    assert torch.isfinite(scored["scores"]).all()
    assert spy.shapes, "the spy saw no fp32 vocabulary-sized tensor: the test would pass vacuously"
    assert all(len(shape) <= 2 for shape in spy.shapes), spy.shapes  # per-row [K, V] only, never [B, K, V]


def test_critic_gradients_are_right_with_activation_checkpointing(tokenizer):
    # Checkpointed layers recompute during backward, when the policy adapter is active: the critic pass must not be
    # checkpointed, or its gradients would flow through the wrong adapter.
    ids, attention, _ = _batch(tokenizer)

    def critic_grads(checkpointing):
        torch.manual_seed(0)
        policy, _, critic = build_single_base(_sft_peft(tokenizer))
        with torch.no_grad():  # make the critic adapter differ from the policy adapter, as after some training
            for name, param in policy.named_parameters():
                if ".critic." in name:
                    param.add_(0.5 * torch.randn_like(param))
        policy.train()
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        values = critic(ids, attention).logits
        policy_logits = policy(input_ids=ids, attention_mask=attention).logits
        (values.square().mean() + policy_logits.float().logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain, checkpointed = critic_grads(False), critic_grads(True)
    assert any(".critic." in n for n in plain) and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_critic_head_width_is_the_lm_heads_input_not_hidden_size(tokenizer):
    # OPT-350m projects its 1024-wide hidden states to 512 before the LM head: the value head must read 512.
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=1,
        num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    base = OPTForCausalLM(config)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _policy, _reward, critic = build_single_base(base, sft_adapter=get_peft_model(base, lora))
    assert critic.score.in_features == 32
    ids, attention, _ = _batch(tokenizer)
    from srppo_trl.models.modeling import token_values

    with torch.no_grad():
        values = token_values(critic, ids, attention)
    assert values.shape[:2] == ids.shape
