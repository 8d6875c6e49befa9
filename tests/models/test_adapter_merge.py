"""LoRA rollouts with the adapter merged into the base weights: same tokens, weights restored
bit for bit, no LoRA branch on the decoding path, and a fallback for what cannot be merged exactly.

Tiny models (srppo_trl.testing) in fp32, 8-token responses.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from srppo_trl import SRPPOTrainer
from srppo_trl.models.adapter_merge import lora_merged_for_generation, mergeable_lora_layers
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_single_base_trainer, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora(tokenizer, **config):
    # init_lora_weights=False: B != 0, so the adapter changes the model and a missing merge would show.
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False) | config
    return get_peft_model(tiny_causal_lm(tokenizer, seed=2), LoraConfig(**config))


def _single_base_trainer(tokenizer, tmp_path, **overrides):
    trainer = tiny_single_base_trainer(tokenizer, tmp_path, _lora(tokenizer), **overrides)
    return trainer, trainer.model.policy


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


def test_merged_weights_built_in_the_autocast_dtype_match_an_in_place_merge(tokenizer):
    """Under bf16 autocast over fp32 weights the merged weights are swapped in already in bf16: the same bf16 weights
    autocast makes of an in-place merge, so the same logits; the fp32 tensors are never written and come back."""
    model = _lora(tokenizer)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = mergeable_lora_layers(model)[0]
    weight = layer.get_base_layer().weight
    storage = weight.data_ptr()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = torch.addmm(weight.detach(), b, a, alpha=layer.scaling["default"]).to(torch.bfloat16)
    # The fused product is W + s B A up to fp32 rounding.
    torch.testing.assert_close(
        expected.float(), (weight + layer.get_delta_weight("default")).to(torch.bfloat16).float(), atol=0, rtol=8e-3
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lora_merged_for_generation(model) as merged:
            assert merged and weight.dtype == torch.float32
            in_place = model(input_ids=ids).logits
        version = weight._version  # bumped by the in-place merge's writes, not by a swap
        with lora_merged_for_generation(model, dtype=torch.bfloat16) as merged:
            assert merged and weight.dtype == torch.bfloat16
            assert torch.equal(weight, expected)
            swapped = model(input_ids=ids).logits
    assert torch.equal(swapped, in_place)
    assert weight._version == version
    assert weight.dtype == torch.float32 and weight.data_ptr() == storage
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mergeable_lora_layers(model)  # the LoRA branches are back on


def test_a_failed_generation_swaps_the_original_weights_back(tokenizer):
    model = _lora(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), lora_merged_for_generation(model, dtype=torch.bfloat16):
        raise RuntimeError("boom")
    assert all(v.dtype == before[k].dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mergeable_lora_layers(model)


def test_a_lora_on_a_tied_weight_keeps_the_unmerged_forward(tokenizer):
    # Merging into a tied lm_head would also move the embeddings: the model keeps the unmerged forward.
    model = tiny_causal_lm(tokenizer, seed=2)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    assert mergeable_lora_layers(model) is None
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        for dtype in (None, torch.bfloat16):
            with lora_merged_for_generation(model, dtype=dtype) as merged:
                assert not merged
                assert torch.equal(model(input_ids=ids).logits, adapted)


def test_bf16_single_base_rollout_swaps_in_bf16_weights_and_samples_as_the_in_place_merge(
    tokenizer, tmp_path, cpu_bf16, monkeypatch
):
    from srppo_trl.trainer import rollout

    trainer, policy = _single_base_trainer(tokenizer, tmp_path, bf16=True)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    q_proj = next(m for n, m in policy.named_modules() if n.endswith("q_proj"))
    dtypes = []
    hook = q_proj.get_base_layer().register_forward_pre_hook(lambda m, a: dtypes.append(m.weight.dtype))
    swapped = _rollout(trainer)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    monkeypatch.setattr(rollout, "_autocast_dtype", lambda device: None)  # the in-place merge
    in_place = _rollout(trainer)
    hook.remove()
    assert set(dtypes) == {torch.float32}
    assert torch.equal(swapped, in_place)
    after = policy.state_dict()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("width", "rows"), [(24, 33), (896, 200)])
@pytest.mark.parametrize("adapters", [["default"], ["default", "second"]])
def test_merged_weights_written_through_a_shared_scratch_equal_a_fresh_merge(width, rows, adapters, dtype):
    """The merged weights are summed in one fp32 scratch shared by the layers and written into a given buffer: bit for
    bit the cast of a fresh `W + s B A`, with one adapter or two and scalings that are not powers of two (fp32 shows
    any rounding difference that bf16 would hide); a stale scratch or buffer content changes nothing."""
    from torch import nn

    from srppo_trl.models.adapter_merge import _merged_in_dtype, _merged_weight

    torch.manual_seed(rows + width)
    base = nn.Sequential(nn.Linear(width, rows, bias=False), nn.Linear(rows, width, bias=False))
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=7, target_modules=["0", "1"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=5, lora_alpha=3, target_modules=["0", "1"], init_lora_weights=False))
    model.base_model.set_adapter(adapters)
    layers = mergeable_lora_layers(model)
    assert len(layers) == 2
    scratch = torch.full((rows * width + 5,), float("nan"))
    for layer in layers:
        weight = layer.get_base_layer().weight
        expected = _merged_weight(layer, weight).to(dtype)
        out = torch.full_like(expected, 7.0)
        assert _merged_in_dtype(layer, weight, dtype, out=out, scratch=scratch) is out
        assert torch.equal(out, expected), weight.shape
        assert torch.equal(_merged_in_dtype(layer, weight, dtype), expected)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merged_layers_run_their_base_layer_directly_and_get_peft_forward_back(tokenizer, dtype):
    """Inside the merge each LoRA layer calls its base linear without PEFT's forward (hooks on the LoRA layer still
    run); on exit, or after an error, PEFT's forward is back, and a forward set on the instance by someone else is
    kept as it is."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _lora(tokenizer)
    layers = mergeable_lora_layers(model)
    own = layers[0]
    own.forward = lambda x, *args, **kwargs: LoraLinear.forward(own, x, *args, **kwargs)
    peft_calls, hook_calls = [], []
    original = LoraLinear.forward

    def counting(self, *args, **kwargs):
        peft_calls.append(self)
        return original(self, *args, **kwargs)

    hooks = [layer.register_forward_hook(lambda *a: hook_calls.append(1)) for layer in layers]
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    try:
        LoraLinear.forward = counting
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            expected = model(input_ids=ids).logits
            peft_calls.clear()
            hook_calls.clear()
            with lora_merged_for_generation(model, dtype=dtype) as merged:
                assert merged
                merged_logits = model(input_ids=ids).logits
                hidden = torch.randn(2, layers[1].in_features)
                # PEFT's own keyword arguments stop at the LoRA layer, as in PEFT's forward.
                layers[1](hidden, adapter_names=["default", "default"])
            assert set(map(id, peft_calls)) == {id(own)}  # only the layer with its own forward went through PEFT's
            assert len(hook_calls) == len(layers) + 1
            with pytest.raises(RuntimeError, match="boom"), lora_merged_for_generation(model, dtype=dtype):
                raise RuntimeError("boom")
            peft_calls.clear()
            model(input_ids=ids)
            assert len(peft_calls) == len(layers)
    finally:
        LoraLinear.forward = original
        for hook in hooks:
            hook.remove()
    assert [layer for layer in layers if "forward" in layer.__dict__] == [own]
    torch.testing.assert_close(merged_logits.float(), expected.float(), atol=0.05 if dtype else 1e-5, rtol=0.05)


def test_merged_layers_run_f_linear_directly_unless_the_base_layer_has_hooks(tokenizer, monkeypatch):
    from torch.nn import functional

    from srppo_trl.models import adapter_merge

    model = _lora(tokenizer).eval()
    ids = torch.randint(3, 60, (2, 7))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    calls, linears = [], []
    real_linear = functional.linear
    monkeypatch.setattr(adapter_merge.F, "linear", lambda *a, **k: linears.append(1) or real_linear(*a, **k))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with lora_merged_for_generation(model):
            direct = model(input_ids=ids).logits
        assert linears  # the merged layers called F.linear themselves, not their base modules
        hook = base.register_forward_hook(lambda *a: calls.append(1))
        with lora_merged_for_generation(model):
            hooked = model(input_ids=ids).logits
        hook.remove()
    assert calls == [1]  # a hook on a base layer still runs: that layer is called as a module
    torch.testing.assert_close(direct, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(direct, hooked)


def test_layers_found_once_give_what_a_fresh_walk_gives(tokenizer, tmp_path, monkeypatch):
    from srppo_trl.models import adapter_merge
    from srppo_trl.trainer import rollout

    trainer, policy = _single_base_trainer(tokenizer, tmp_path)
    found = adapter_merge.lora_layers(policy)
    assert mergeable_lora_layers(policy, found) == mergeable_lora_layers(policy)
    walks = []
    real = rollout.lora_layers
    monkeypatch.setattr(rollout, "lora_layers", lambda model: walks.append(1) or real(model))
    first, second = _rollout(trainer, seed=0), _rollout(trainer, seed=0)
    assert len(walks) == 1 and torch.equal(first, second)  # the trainer walks the policy once, not per rollout
    with policy.disable_adapter():  # state changes are still seen with the layers found before
        assert mergeable_lora_layers(policy, found) is None


def test_on_a_cpu_the_merged_weights_are_swapped_in_and_the_base_weights_are_never_written(tokenizer):
    model = _lora(tokenizer)
    layers = mergeable_lora_layers(model)
    originals = {id(layer): layer.get_base_layer().weight.data for layer in layers}
    versions = {id(layer): t._version for layer in layers for t in [originals[id(layer)]]}
    copies = {key: t.clone() for key, t in originals.items()}
    with torch.no_grad(), lora_merged_for_generation(model) as merged:
        assert merged
        for layer in layers:
            weight = layer.get_base_layer().weight
            assert weight.data.data_ptr() != originals[id(layer)].data_ptr()  # a tensor of its own
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            expected = copies[id(layer)].clone().addmm_(b, a, alpha=layer.scaling["default"])  # the in-place merge
            assert torch.equal(weight.data, expected)
    for layer in layers:
        data = layer.get_base_layer().weight.data
        assert data.data_ptr() == originals[id(layer)].data_ptr() and data._version == versions[id(layer)]
        assert torch.equal(data, copies[id(layer)])
