"""The code paths that DeepSpeed ZeRO-3 / FSDP take, exercised on one CPU process.

Under ZeRO-3 the unwrapped modules hold only this process's shards: `Trainer.save_model` gathers the full state dict
and hands it to `_save`, which must write *that*; and generation must gather the weights once per rollout
(`unwrap_model_for_generation`, `ds3_gather_for_generation`) rather than layer by layer at every decoding step.
"""

import pytest
import torch
from safetensors.torch import load_file

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _trainer(tokenizer, tmp_path, **overrides):
    return SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, **overrides),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
    )


def test_save_writes_the_gathered_state_dict_it_is_given(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    # Stand-in for the full weights Trainer.save_model gathers under ZeRO-3: different from the local module's.
    gathered = {k: v.detach().clone() + 1.0 for k, v in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "checkpoint-1"), state_dict=gathered)
    policy = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    critic = load_file(tmp_path / "checkpoint-1" / "value_model" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(policy[name], gathered[f"policy.{name}"])
    assert not torch.equal(policy[name], trainer.model.policy.state_dict()[name])
    assert torch.equal(critic[name], gathered[f"value_model.{name}"])


def test_save_without_a_state_dict_writes_the_modules_weights(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path)
    trainer._save(str(tmp_path / "final"))
    name = "model.layers.0.self_attn.q_proj.weight"
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert torch.equal(saved[name], trainer.model.policy.state_dict()[name])


def _spy_on_trls_unwrapping(monkeypatch):
    import trl.models.utils as trl_utils

    calls = []
    original = trl_utils.unwrap_model_for_generation

    def spy(model, accelerator, gather_deepspeed3_params=True, **kwargs):
        calls.append(gather_deepspeed3_params)
        return original(model, accelerator, gather_deepspeed3_params=gather_deepspeed3_params, **kwargs)

    monkeypatch.setattr(trl_utils, "unwrap_model_for_generation", spy)
    return calls


@pytest.mark.parametrize("gather", [True, False])
def test_generation_under_deepspeed_goes_through_trls_unwrapping_with_the_gather_setting(
    tokenizer, tmp_path, monkeypatch, gather
):
    calls = _spy_on_trls_unwrapping(monkeypatch)
    trainer = _trainer(tokenizer, tmp_path, ds3_gather_for_generation=gather)
    batch = trainer._collate([trainer.train_dataset[i] for i in range(2)])
    trainer.generate_rollouts(batch)
    assert calls == []  # no DeepSpeed, no checkpointing: nothing for TRL's context to do
    trainer.is_deepspeed_enabled = True  # the routing only: this process runs no DeepSpeed engine
    trainer.generate_rollouts(batch)
    assert calls == [gather]


def test_generation_with_activation_checkpointing_goes_through_trls_unwrapping(tokenizer, tmp_path, monkeypatch):
    calls = _spy_on_trls_unwrapping(monkeypatch)
    trainer = _trainer(tokenizer, tmp_path, activation_checkpointing=True)
    trainer.train()
    assert calls and all(c is True for c in calls)


def test_activation_checkpointing_is_back_on_after_each_rollout(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, activation_checkpointing=True)
    seen = []
    original = trainer.make_rollout_buffer

    def spy(batch):
        buffer = original(batch)
        seen.append(trainer.model.is_gradient_checkpointing)
        return buffer

    trainer.make_rollout_buffer = spy
    trainer.train()
    assert seen == [True, True]


def test_with_peft_the_built_critic_is_a_lora_adapter_with_a_trainable_head(tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = tiny_srppo_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
        peft_config=lora,
    )
    critic = trainer.model.value_model
    assert hasattr(critic, "peft_config")
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in critic.parameters())
    assert sum(p.numel() for n, p in critic.named_parameters() if n in trainable) < total / 5
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    trainer.train()
    for name, param in critic.named_parameters():
        changed = not torch.equal(param, before[name])
        if "lora_B" in name or ("score" in name and "modules_to_save" in name):
            assert changed, name
        elif name not in trainable:
            assert not changed, f"frozen critic weight {name} changed"
    # Checkpoints hold the critic's adapter, and resuming loads it back.
    assert (tmp_path / "checkpoint-1" / "value_model" / "adapter_model.safetensors").exists()
    resumed = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
        peft_config=lora,
    )
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for (name, a), (_, b) in zip(critic.named_parameters(), resumed.model.value_model.named_parameters()):
        assert torch.equal(a, b), name


def test_vocabulary_size_of_a_zero3_partitioned_model_is_its_full_size(tokenizer):
    from srppo_trl.models.coherent_reward import vocab_size

    model = tiny_causal_lm(tokenizer)
    weight = model.get_output_embeddings().weight
    # What ZeRO-3 (`zero3_init_flag`) leaves in each process: an empty tensor, the full shape in `ds_shape`.
    weight.ds_shape, weight.data = weight.shape, torch.empty(0)
    assert vocab_size(model) == len(tokenizer)


def test_a_zero3_partitioned_critic_is_checked_without_a_forward(tokenizer, monkeypatch):
    from transformers import AutoModelForTokenClassification

    from srppo_trl.models.modeling import check_value_model

    def partitioned(model):
        for i, param in enumerate(model.parameters()):
            param.ds_id = i
        monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("forward on partitioned weights"))
        return model

    config = tiny_causal_lm(tokenizer).config
    config.num_labels = 1
    critic = AutoModelForTokenClassification.from_config(config)
    check_value_model(partitioned(critic))
    with pytest.raises(ValueError, match="must return one scalar per token, but it is a LlamaForCausalLM"):
        check_value_model(partitioned(tiny_causal_lm(tokenizer)))


class _WithBuffer(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.model = torch.nn.Linear(3, 3)
        torch.nn.init.constant_(self.model.weight, value)
        self.register_buffer("scale", torch.full((3,), value))  # persistent: in the state dict, never partitioned
        self.register_buffer("scratch", torch.full((3,), value), persistent=False)


def test_the_critic_copy_gathers_one_weight_at_a_time_and_copies_buffers_on_every_rank(monkeypatch):
    """Under ZeRO-3 only rank 0 writes the gathered weights (DeepSpeed broadcasts them); buffers are not partitioned,
    so every rank copies its own. And no gather holds more than one weight of each model (a 7B critic copy would
    otherwise hold two whole models on every GPU)."""
    from srppo_trl.models import modeling

    gathered_sizes = []
    real = modeling._gathered_params

    def recording(params, modifier_rank=None):
        gathered_sizes.append(len(params))
        return real(params, modifier_rank)

    monkeypatch.setattr(modeling, "_gathered_params", recording)
    source, critic = _WithBuffer(1.0), _WithBuffer(2.0)
    monkeypatch.setattr(modeling, "_is_rank_zero", lambda module: False)  # a rank other than 0
    modeling._copy_backbone(source, critic)
    assert torch.equal(critic.model.weight, torch.full((3, 3), 2.0))  # weights: rank 0's job
    assert torch.equal(critic.scale, torch.ones(3))  # persistent buffer: copied here too
    assert torch.equal(critic.scratch, torch.full((3,), 2.0))  # not in the state dict: the critic's own
    assert gathered_sizes and max(gathered_sizes) == 1

    monkeypatch.setattr(modeling, "_is_rank_zero", lambda module: True)
    modeling._copy_backbone(source, critic)
    assert torch.equal(critic.model.weight, source.model.weight)
    assert torch.equal(critic.model.bias, source.model.bias)


def test_weights_offloaded_to_meta_do_not_decide_where_a_new_head_lives(tokenizer):
    """accelerate's `device_map` offload leaves weights on `meta` outside their forward: a value head placed on the
    first parameter's device would be a tensor without data."""
    from srppo_trl.models.modeling import materialised_device
    from srppo_trl.models.single_base import _head_device

    model = tiny_causal_lm(tokenizer)
    model.get_input_embeddings().to("meta")
    assert next(model.parameters()).device.type == "meta"
    assert materialised_device(model) == torch.device("cpu")
    assert _head_device(model) == torch.device("cpu")

    class Hook:  # what accelerate's dispatch attaches to the LM head
        execution_device = "cpu"

    model.get_output_embeddings()._hf_hook = Hook()
    assert _head_device(model) == torch.device("cpu")
    Hook.execution_device = 0
    assert _head_device(model) == torch.device("cuda", 0)
