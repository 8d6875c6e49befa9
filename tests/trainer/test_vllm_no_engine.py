"""The weights `use_vllm=True` pushes to vLLM, checked without vLLM: what a consumer that keeps every tensor until the
push ends (vLLM's packed NCCL broadcast, used by TRL's server mode) receives, the names it receives them under, and the
combinations refused because the push could not be exact.

Tiny 2-layer Llama models with LoRA adapters whose B matrices are random (PEFT starts B at 0, where merged and unmerged
weights would be equal and the checks would say nothing).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl.distributed import DistributedBackend

from srppo_trl.models.single_base import build_single_base
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer.vllm_rollout import _generation_class, check_exact_weight_push


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora_model(tokenizer, **lora):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_causal_lm(tokenizer, seed=1), LoraConfig(**{**config, **lora}))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(std=0.5)
    return model


def _generation(model, sharded=False):
    """Our `VLLMGeneration` around `model` with no engine behind it: only its weight iterator is used."""
    cls = _generation_class()
    generation = cls.__new__(cls)
    no_engine = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None))
    generation.model, generation._dist, generation._sharded = model, DistributedBackend(no_engine), sharded
    return generation


def _pack_like_vllm(named_tensors) -> dict:
    """vLLM's `pack_tensors`: every tensor is kept (as a flat uint8 view) until the iterator ends, and only then
    concatenated into the buffer that is broadcast; the receiver splits it back."""
    names, shapes, dtypes, flat = [], [], [], []
    for name, tensor in named_tensors:
        names.append(name), shapes.append(tensor.shape), dtypes.append(tensor.dtype)
        flat.append(tensor.contiguous().view(torch.uint8).view(-1))
    packed = torch.cat(flat)
    received, offset = {}, 0
    for name, shape, dtype, piece in zip(names, shapes, dtypes, flat):
        received[name] = packed[offset : offset + piece.numel()].view(dtype).view(shape).clone()
        offset += piece.numel()
    return received


def _merged_state(peft_model) -> dict:
    """W + s B A for every weight, under the plain model's names."""
    return {k: v.clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("sharded", [False, True], ids=["exact_merge", "trl_merge_unmerge"])
def test_a_consumer_that_keeps_every_tensor_receives_the_merged_policy(tokenizer, sharded):
    # sharded=True takes TRL's merge_adapter/unmerge_adapter path (our fallback under DeepSpeed/FSDP): it too yields
    # weights that are changed back after the last one is yielded.
    model = _lora_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _merged_state(model)

    received = _pack_like_vllm(_generation(model, sharded)._iter_named_params())

    assert set(received) == set(expected)
    delta = (
        expected["model.layers.0.self_attn.q_proj.weight"]
        - before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    )
    assert delta.abs().max() > 1e-2, "the LoRA delta is too small for the check to say anything"
    for name, tensor in expected.items():
        torch.testing.assert_close(received[name], tensor, rtol=0, atol=1e-6, msg=name)
    if not sharded:  # the exact merge leaves the base bit for bit as it was
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_single_base_with_modules_to_save_pushes_the_policys_copy_under_the_base_name(tokenizer):
    # The SFT adapter trains lm_head as a full copy (modules_to_save): the policy ("default") holds its own copy,
    # next to the SFT's and the critic's. vLLM knows one `lm_head.weight`: the policy's.
    sft = _lora_model(tokenizer, modules_to_save=["lm_head"])
    policy, _, _ = build_single_base(sft)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "modules_to_save.default." in name:
                param.add_(1.0)  # the policy's copy moved in training; the SFT's did not
    policy_head = next(p for n, p in policy.named_parameters() if "lm_head.modules_to_save.default." in n)
    plain = tiny_causal_lm(tokenizer, seed=1).state_dict()

    received = _pack_like_vllm(_generation(policy)._iter_named_params())

    assert set(received) == set(plain)
    torch.testing.assert_close(received["lm_head.weight"], policy_head.detach(), rtol=0, atol=0)


def test_the_engines_initial_weights_of_a_single_base_policy_with_modules_to_save(tokenizer, tmp_path):
    # A policy built in memory is saved once for vLLM to start from: merged, and with the policy's lm_head copy.
    from transformers import AutoModelForCausalLM

    from srppo_trl.trainer.vllm_rollout import _engine_path

    policy, _, _ = build_single_base(_lora_model(tokenizer, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "modules_to_save.default." in name:
                param.add_(1.0)
    expected = _merged_state(policy)

    folder = _engine_path(policy, str(tmp_path), tokenizer, is_main_process=True)
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()

    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=name)


def _single_base_trainer(tokenizer, deepspeed=False, fsdp=False):
    policy, reward, _ = build_single_base(_lora_model(tokenizer))
    return SimpleNamespace(
        reward_model=reward,
        model=policy,
        accelerator=SimpleNamespace(unwrap_model=lambda model: model),
        is_deepspeed_enabled=deepspeed,
        is_fsdp_enabled=fsdp,
        args=SimpleNamespace(use_vllm=True),
    )


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_single_base_vllm_under_a_sharding_engine_is_refused(tokenizer, engine):
    trainer = _single_base_trainer(tokenizer, **{engine: True})
    with pytest.raises(ValueError, match="use_vllm with a single-base policy"):
        check_exact_weight_push(trainer, trainer.model)


def test_single_base_vllm_with_a_quantized_base_is_refused_at_trainer_init(tokenizer, tmp_path):
    from srppo_trl import SRPPOTrainer
    from srppo_trl.testing import tiny_prompts, tiny_srppo_config

    policy, reward, critic = build_single_base(_lora_model(tokenizer))
    policy.get_base_model().is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    with pytest.raises(ValueError, match="use_vllm with a single-base policy"):
        SRPPOTrainer(
            args=tiny_srppo_config(tmp_path, use_vllm=True),
            processing_class=tokenizer,
            model=policy,
            reward_model=reward,
            value_model=critic,
            train_dataset=tiny_prompts(),
        )


def test_single_base_vllm_with_an_exactly_mergeable_adapter_passes_the_check(tokenizer):
    trainer = _single_base_trainer(tokenizer)
    check_exact_weight_push(trainer, trainer.model)  # no error: the push takes the exact merge


class _RecordingGeneration:
    """Stands in for the trainer's `VLLMGeneration`: records the sampling settings of each `generate` call."""

    def __init__(self, model, temperature, top_k, top_p, max_completion_length):
        self.model, self.calls = model, []
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_completion_length = max_completion_length

    def generate(self, prompts, images, num_generations):
        self.calls.append((self.temperature, self.top_k, self.top_p, self.max_completion_length))
        completions = [[5] * self.max_completion_length for _ in prompts]
        return prompts, completions, [[[-1.0]] * len(c) for c in completions], None

    def sync_weights(self):
        pass


def test_generate_completions_samples_near_greedy_through_vllm_too(tokenizer, tmp_path):
    from srppo_trl import CoherentRewardModel, SRPPOTrainer
    from srppo_trl.testing import tiny_prompts, tiny_srppo_config

    args = tiny_srppo_config(tmp_path, temperature=0.7, per_device_eval_batch_size=4)
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
        eval_dataset=tiny_prompts(4),
    )
    fake = _RecordingGeneration(trainer.model.policy, args.temperature, args.top_k, args.top_p, args.response_length)
    trainer.vllm_generation = fake

    trainer.generate_completions()
    trainer.generate_rollouts(next(iter(trainer.get_train_dataloader())))

    (table_temperature, *_), (rollout_temperature, *rollout_rest) = fake.calls
    assert table_temperature == pytest.approx(0.01, abs=1e-6)  # TRL 1.12's near-greedy table, as without vLLM
    assert (rollout_temperature, *rollout_rest) == (0.7, 0, 1.0, args.response_length)  # the rollouts' own settings
    assert (fake.temperature, fake.max_completion_length) == (0.7, args.response_length)  # restored
