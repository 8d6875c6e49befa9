"""Frozen fp32 weights cast to bf16 once per run (`FrozenWeightCasts`), not at every forward under autocast.

The copy is the very tensor autocast would have made, so everything downstream is bit for bit the same: these tests
compare outputs, gradients and a whole bf16 training run with and without the cache, and check when a copy is made
again (the weight changed), when it is not used (trainable layers, no autocast, a merged weight swapped in), and that
every patched layer gets its own forward back.
"""

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from srppo_trl.models.adapter_merge import lora_merged_for_generation
from srppo_trl.testing import (
    tiny_causal_lm,
    tiny_prompts,
    tiny_single_base_trainer,
    tiny_srppo_trainer,
    tiny_tokenizer,
)
from srppo_trl.trainer.precision import FrozenWeightCasts, lora_input_casts_skipped


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora_model(tokenizer, seed=4):
    return get_peft_model(
        tiny_causal_lm(tokenizer, seed=seed),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )


def _ids():
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def _forward_backward(model, casts):
    """bf16-autocast logits and the trainable weights' gradients of a log-softmax loss."""
    model.zero_grad()
    with casts.installed([model]) if casts is not None else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=_ids()).logits
        loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _patched(model):
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def test_outputs_and_gradients_are_bit_for_bit_those_of_autocast(tokenizer):
    model = _lora_model(tokenizer)
    expected_logits, expected_grads = _forward_backward(model, None)
    casts = FrozenWeightCasts()
    logits, grads = _forward_backward(model, casts)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected_logits)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name
    frozen_linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and not m.weight.requires_grad and m.weight.dtype == torch.float32
    ]
    assert len(casts) == len({id(m.weight) for m in frozen_linears}) > 0
    # A second pass reuses every copy: none is made again.
    copies = {key: entry[-1] for key, entry in casts._copies.items()}
    _forward_backward(model, casts)
    assert all(casts._copies[key][-1] is copy for key, copy in copies.items())
    assert _patched(model) == []


def test_trainable_layers_and_passes_without_autocast_are_left_alone(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=5)
    model.requires_grad_(False)
    trainable = model.model.layers[0].self_attn.q_proj
    trainable.weight.requires_grad_(True)
    casts = FrozenWeightCasts()
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
        with casts.installed([model, model]):  # a model given twice is patched once
            patched = _patched(model)
            assert patched and "model.layers.0.self_attn.q_proj" not in patched
            assert torch.equal(model(input_ids=_ids()).logits, expected)  # fp32: the layers' own forward
    assert len(casts) == 0 and _patched(model) == []


def test_a_weight_changed_in_place_gets_a_new_copy(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=6).requires_grad_(False)
    casts = FrozenWeightCasts()

    def logits(with_casts):
        with torch.no_grad(), casts.installed([model]) if with_casts else nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(input_ids=_ids()).logits

    logits(True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(3.0)  # e.g. an in-place adapter merge
    assert torch.equal(logits(True), logits(False))


def test_a_merged_weight_swapped_in_for_generation_is_used_as_it_is(tokenizer):
    """Generation swaps merged bf16 weights into the LoRA base layers: those layers run them, not the copies of the
    unmerged weights; once swapped back the copies are used again, still valid."""
    model = _lora_model(tokenizer).eval()
    casts = FrozenWeightCasts()
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)

    def sample(with_casts):
        torch.manual_seed(0)
        with torch.no_grad(), casts.installed([model]) if with_casts else nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with lora_merged_for_generation(model, dtype=torch.bfloat16) as merged:
                    assert merged
                    return model.generate(_ids(), attention_mask=torch.ones_like(_ids()), **kwargs)

    assert torch.equal(sample(True), sample(False))
    before = len(casts)
    assert torch.equal(_forward_backward(model, casts)[0], _forward_backward(model, None)[0])
    assert len(casts) > before  # the LoRA base layers' own copies, made now that their fp32 weights are back


def _bf16_logits(model, casts=None):
    with torch.no_grad(), casts.installed([model]) if casts is not None else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=_ids()).logits


def test_a_weight_trained_in_between_gets_a_new_copy_when_frozen_again(tokenizer):
    # An optimizer step need not bump the version counter (fused AdamW writes in place without it), so a weight
    # found trainable loses its copy.
    model = tiny_causal_lm(tokenizer, seed=8).requires_grad_(False)
    up = model.model.layers[0].mlp.up_proj.weight
    casts = FrozenWeightCasts()
    _bf16_logits(model, casts)
    assert id(up) in casts._copies
    up.requires_grad_(True)
    with casts.installed([model]):
        assert id(up) not in casts._copies
    up.requires_grad_(False)
    up.data.mul_(2.0)  # through `.data`: no version bump
    assert torch.equal(_bf16_logits(model, casts), _bf16_logits(model))


def test_copies_of_weights_no_longer_patched_are_dropped(tokenizer):
    first, second = tiny_causal_lm(tokenizer, seed=9), tiny_causal_lm(tokenizer, seed=10)
    first.requires_grad_(False), second.requires_grad_(False)
    casts = FrozenWeightCasts()
    _bf16_logits(first, casts)
    count = len(casts)
    _bf16_logits(second, casts)
    assert len(casts) == count  # the first model's copies went, the second's came
    assert not {id(p) for p in first.parameters()} & set(casts._copies)


def test_a_layer_with_its_own_forward_is_left_alone(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=11).requires_grad_(False)
    head = model.lm_head
    own = head.forward
    head.forward = mine = lambda hidden: own(hidden)  # e.g. a value head kept in fp32
    try:
        with FrozenWeightCasts().installed([model]):
            assert head.__dict__["forward"] is mine and "model.layers.0.mlp.up_proj" in _patched(model)
        assert head.__dict__["forward"] is mine and _patched(model) == ["lm_head"]
    finally:
        del head.forward


def test_an_evaluation_outside_training_keeps_no_copies(cpu_bf16, tokenizer, tmp_path):
    trainer = tiny_srppo_trainer(tokenizer, tmp_path, bf16=True)
    made = []
    original = trainer._frozen_weight_casts.cast
    trainer._frozen_weight_casts.cast = lambda weight, dtype: made.append(1) or original(weight, dtype)
    trainer.evaluate(tiny_prompts(4))
    assert made and len(trainer._frozen_weight_casts) == 0


def test_patched_forwards_are_restored_after_an_error(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=7).requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"), FrozenWeightCasts().installed([model]):
        assert _patched(model)
        raise RuntimeError("boom")
    assert _patched(model) == []


@pytest.mark.parametrize("single_base", [False, True])
def test_a_bf16_run_trains_the_same_weights_with_and_without_the_cache(
    cpu_bf16, tokenizer, tmp_path, single_base, monkeypatch
):
    made, input_casts = [], _counting_input_casts(monkeypatch)
    input_casts_by_run = {}

    def run(cache):
        settings = dict(bf16=True, cache_frozen_weight_casts=cache)
        if single_base:
            # Activation checkpointing: the backward's recomputed forwards take the copies too.
            sft = _lora_model(tokenizer, seed=2)
            trainer = tiny_single_base_trainer(
                tokenizer, tmp_path / str(cache), sft, activation_checkpointing=True, **settings
            )
        else:
            trainer = tiny_srppo_trainer(tokenizer, tmp_path / str(cache), **settings)
        casts = trainer._frozen_weight_casts
        assert (casts is not None) == cache
        if casts is not None:
            original, original_buffer = casts.cast, casts.buffer
            casts.cast = lambda weight, dtype: made.append(id(weight)) or original(weight, dtype)
            casts.buffer = lambda weight, dtype: buffers.append(original_buffer(weight, dtype)) or buffers[-1]
        input_casts.clear()
        trainer.train()
        input_casts_by_run[cache] = len(input_casts)
        assert casts is None or (len(casts) == 0 and not casts._buffers)  # copies and buffers dropped after training
        model = trainer.accelerator.unwrap_model(trainer.model)
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    buffers = []
    with_cache, without = run(True), run(False)
    assert made and len(made) > len(set(made))  # copies were used, and reused across passes
    if single_base:  # the merged policy weights were written into the same buffers at every rollout
        assert buffers and len({id(b) for b in buffers}) < len(buffers)
        # PEFT's casts of bf16 LoRA inputs (down_proj's) to fp32 were skipped with the cache, made without it.
        assert input_casts_by_run == {True: 0, False: input_casts_by_run[False]} and input_casts_by_run[False] > 0
        assert len({id(b) for b in buffers}) == len({(b.data_ptr(), b.shape) for b in buffers})
    assert with_cache.keys() == without.keys()
    for name in without:
        assert torch.equal(with_cache[name], without[name]), name


def test_the_cache_is_on_by_default_for_mixed_precision_on_a_cpu_only(cpu_bf16, tokenizer, tmp_path):
    assert tiny_srppo_trainer(tokenizer, tmp_path / "bf16", bf16=True)._frozen_weight_casts is not None
    assert tiny_srppo_trainer(tokenizer, tmp_path / "fp32", bf16=False)._frozen_weight_casts is None


def _counting_input_casts(monkeypatch):
    """Counts the casts PEFT's LoRA linears make of their input (to the adapter's dtype)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    casts = []
    original = LoraLinear._cast_input_dtype

    def counting(self, x, dtype):
        if x is not None and x.dtype != dtype:
            casts.append((x.dtype, dtype))
        return original(self, x, dtype)

    monkeypatch.setattr(LoraLinear, "_cast_input_dtype", counting)
    return casts


def test_lora_input_casts_skipped_under_autocast_change_no_bit(tokenizer, monkeypatch):
    """Under bf16 autocast over fp32 adapters PEFT copies each LoRA input to fp32 and autocast copies it back: skipped,
    the logits and every gradient are the same bit for bit, and the layers get their own method back."""
    casts = _counting_input_casts(monkeypatch)
    model = _lora_model(tokenizer)
    expected_logits, expected_grads = _forward_backward(model, FrozenWeightCasts())
    assert casts and set(casts) == {(torch.bfloat16, torch.float32)}
    casts.clear()
    with lora_input_casts_skipped([model, model]):  # a model given twice is patched once
        logits, grads = _forward_backward(model, FrozenWeightCasts())
    assert casts == []
    assert torch.equal(logits, expected_logits)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name
    assert not any("_cast_input_dtype" in m.__dict__ for m in model.modules())


def test_lora_input_casts_are_kept_where_autocast_would_not_undo_them(tokenizer, monkeypatch):
    casts = _counting_input_casts(monkeypatch)
    # A bf16 base with fp32 adapters (PEFT's default upcast) outside autocast: the fp32 adapter needs the fp32 input.
    model = get_peft_model(
        tiny_causal_lm(tokenizer, seed=4).to(torch.bfloat16),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
        with lora_input_casts_skipped([model]):
            assert torch.equal(model(input_ids=_ids()).logits, expected)
    assert casts and all(c == (torch.bfloat16, torch.float32) for c in casts)
    # Active LoRA dropout would act on the fp32 copy: the cast stays (down_proj's input is bf16 under autocast; the
    # attention projections take the fp32 residual stream's norm and have nothing to cast).
    model = get_peft_model(
        tiny_causal_lm(tokenizer, seed=4),
        LoraConfig(r=4, target_modules=["down_proj"], lora_dropout=0.5, init_lora_weights=False),
    ).train()
    casts.clear()
    with lora_input_casts_skipped([model]), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=_ids())
    assert casts
