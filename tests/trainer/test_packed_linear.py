"""bf16 generation on a CPU with the policy's linear weights packed for oneDNN once per rollout (`packed_linear`).

Which layers are packed (plain linears, LoRA layers run as their merged base, never the adapters' own linears), that
the packed product is `F.linear`'s, that forwards come back on exit, and the trainer's rollouts with it on and off.
Tiny models (srppo_trl.testing).
"""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from srppo_trl.models.adapter_merge import lora_merged_for_generation
from srppo_trl.testing import tiny_causal_lm, tiny_single_base_trainer, tiny_srppo_trainer, tiny_tokenizer
from srppo_trl.trainer.packed_linear import (
    _targets,
    linears_packed_for_generation,
    pack_weight,
    packed_linear,
    packing_available,
)
from srppo_trl.trainer.precision import FrozenWeightCasts


needs_packing = pytest.mark.skipif(not packing_available(), reason="no oneDNN bf16 support on this CPU")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _lora(tokenizer, seed=2):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(tiny_causal_lm(tokenizer, seed=seed), config)


def _packed(model) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if getattr(module.__dict__.get("forward"), "packed_for_generation", False)
    ]


def _packing_is_exact_here() -> bool:
    """Whether the packed product is `F.linear`'s bit for bit at the tiny models' sizes (hidden 32, up to 8 prompts of
    a dozen tokens) on this CPU and thread count. (At larger sizes on several threads oneDNN may split the two products
    differently: benchmarks/bench_packed_linear.py.)"""
    torch.manual_seed(0)
    for out_features, in_features in ((64, 32), (32, 64), (len(tiny_tokenizer()), 32)):
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
        for rows in (1, 8, 96):
            x = torch.randn(rows, 1, in_features, dtype=torch.bfloat16)
            if not torch.equal(packed_linear(x, pack_weight(weight, 8), None), F.linear(x, weight)):
                return False
    return True


def _same_product(out, x, weight, bias=None):
    """`out` is `F.linear(x, weight, bias)` in bf16 up to the order of the sums: at most one bf16 unit in the last
    place of the result plus fp32 accumulation error (bit for bit on the CPUs measured; the slack keeps the check
    meaningful on a CPU whose kernels sum in another order)."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    terms = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    ulp = torch.pow(2.0, torch.floor(torch.log2(exact.abs().clamp_min(2.0**-100))) - 7)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert bool(((out.double() - exact).abs() <= ulp + 2.0**-20 * terms).all())


def _same_logits(a, b):
    """Logits of a whole model: bit for bit where oneDNN's packed product is (several layers deep, a last-bit
    difference has no simple bound); skipped on a CPU where it is not."""
    if not _packing_is_exact_here():
        pytest.skip("oneDNN's packed product sums in another order than F.linear on this CPU")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- which layers


def test_plain_linears_and_merged_lora_layers_are_targets_but_never_the_adapters_own_linears(tokenizer):
    model = _lora(tokenizer)
    modules = list(model.modules())
    plain = {id(m) for m in modules if type(m) is nn.Linear}
    adapters = {id(m) for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n}
    assert adapters and adapters <= plain

    # Unmerged: the LoRA layers call their base linear, which is packed; the adapters' lora_A/lora_B are not.
    targets = _targets(modules)
    assert {id(t) for t, _ in targets} == plain - adapters
    assert all(t is linear for t, linear in targets)

    # Merged for generation: each LoRA layer runs its base weight itself, so the LoRA layer is the target.
    with torch.no_grad(), lora_merged_for_generation(model):
        targets = _targets(list(model.modules()))
    lora_layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "up_proj"))]
    by_module = {id(t): linear for t, linear in targets}
    for layer in lora_layers:
        assert by_module[id(layer)] is layer.get_base_layer()
        assert id(layer.get_base_layer()) not in by_module
    assert not adapters & set(by_module)


def test_layers_with_a_forward_of_their_own_or_accelerate_hooks_are_left_alone(tokenizer):
    model = tiny_causal_lm(tokenizer)
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    layers[0].forward = lambda x: x
    layers[1]._hf_hook = object()
    layers[2].register_forward_hook(lambda *a: None)  # hooks of its own run around the packed product: still packed
    targets = {id(t) for t, _ in _targets(list(model.modules()))}
    assert id(layers[0]) not in targets and id(layers[1]) not in targets and id(layers[2]) in targets


# ---------------------------------------------------------------------------------------------- the product


@needs_packing
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (3, 1, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_packed_product_is_f_linear(shape, with_bias):
    torch.manual_seed(0)
    weight = torch.randn(40, 48, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(*shape, dtype=torch.bfloat16)
    _same_product(packed_linear(x, pack_weight(weight, rows=shape[0]), bias), x, weight, bias)
    # A non-contiguous slice, as the LM head's input. (With a bias F.linear rounds the product of such an input before
    # adding the bias; the packed product rounds once, as F.linear does for the same input made contiguous.)
    wide = torch.randn(shape[0], 3, 96, dtype=torch.bfloat16)[:, -1:, :48]
    _same_product(packed_linear(wide, pack_weight(weight), bias), wide, weight, bias)
    if _packing_is_exact_here():
        assert torch.equal(packed_linear(x, pack_weight(weight), bias), F.linear(x, weight, bias))
        assert torch.equal(packed_linear(wide, pack_weight(weight), bias), F.linear(wide.contiguous(), weight, bias))


def _bf16_logits(model, ids):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(ids).logits


@needs_packing
def test_under_bf16_autocast_every_linear_is_packed_and_the_logits_are_the_same(tokenizer):
    model = tiny_causal_lm(tokenizer).eval()
    ids = torch.randint(3, len(tokenizer), (3, 9))
    expected = _bf16_logits(model, ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with linears_packed_for_generation(list(model.modules()), rows=3) as packed:
            assert packed
            assert len(_packed(model)) == sum(type(m) is nn.Linear for m in model.modules())
            logits = model(ids).logits
    _same_logits(logits, expected)
    assert _packed(model) == [] and all("forward" not in m.__dict__ for m in model.modules())


@needs_packing
def test_a_merged_lora_policy_generates_the_same_logits_packed(tokenizer):
    model = _lora(tokenizer).eval()
    ids = torch.randint(3, len(tokenizer), (2, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lora_merged_for_generation(model, dtype=torch.bfloat16):
            expected = model(ids).logits
            with linears_packed_for_generation(list(model.modules()), rows=2):
                packed = _packed(model)
                logits = model(ids).logits
            merged_forwards = [m for m in model.modules() if "forward" in m.__dict__]
    assert any(name.endswith("q_proj") for name in packed)  # the LoRA layers themselves
    assert not any("lora_" in name for name in packed)
    assert merged_forwards  # the merge's own forwards were back after packing, then removed by the merge on exit
    assert all("forward" not in m.__dict__ for m in model.modules())
    _same_logits(logits, expected)


@needs_packing
def test_nothing_is_packed_in_fp32_with_gradients_on_or_when_disabled(tokenizer):
    model = tiny_causal_lm(tokenizer)
    modules = list(model.modules())
    with torch.no_grad(), linears_packed_for_generation(modules) as packed:  # fp32, no autocast
        assert not packed and _packed(model) == []
    with torch.autocast("cpu", dtype=torch.bfloat16), linears_packed_for_generation(modules) as packed:  # grads on
        assert not packed
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with linears_packed_for_generation(modules, enabled=False) as packed:
            assert not packed


@needs_packing
def test_inputs_the_packed_product_does_not_take_go_to_the_layers_own_forward(tokenizer):
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    x32 = torch.randn(2, 8)
    with torch.no_grad():
        with linears_packed_for_generation([layer]) as packed:  # a bf16 layer outside autocast: packed
            assert packed
            with pytest.raises(RuntimeError):  # an fp32 input to a bf16 weight fails as it does unpacked
                layer(x32)
            _same_product(layer(x32.bfloat16()), x32.bfloat16(), layer.weight, layer.bias)
    with pytest.raises(RuntimeError):
        F.linear(x32, layer.weight, layer.bias)


@needs_packing
def test_forwards_are_restored_after_an_error(tokenizer):
    model = tiny_causal_lm(tokenizer)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with linears_packed_for_generation(list(model.modules())):
                assert _packed(model)
                raise RuntimeError("boom")
    assert _packed(model) == [] and all("forward" not in m.__dict__ for m in model.modules())


@needs_packing
def test_frozen_weights_are_packed_once_per_run_and_again_when_they_change(tokenizer):
    casts = FrozenWeightCasts()
    weight = nn.Parameter(torch.randn(6, 8), requires_grad=False)
    first = casts.packed(weight, torch.bfloat16, rows=2)
    assert casts.packed(weight, torch.bfloat16, rows=2) is first
    with torch.no_grad():
        weight.add_(1.0)  # an in-place change: a new bf16 copy, so a new packed copy
    second = casts.packed(weight, torch.bfloat16, rows=2)
    assert second is not first
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    _same_product(packed_linear(x, second, None), x, weight.to(torch.bfloat16))
    casts.clear()
    assert not casts._packed


@needs_packing
def test_fp16_autocast_over_bf16_weights_is_left_alone(tokenizer):
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        expected = layer(x)
        with linears_packed_for_generation([layer]) as packed:
            assert not packed
    assert expected.dtype == torch.float16
    with torch.no_grad(), linears_packed_for_generation([layer]) as packed:  # bf16 weights, no autocast: packed
        assert packed
        with torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast entered inside: the layer's own forward
            assert torch.equal(layer(x), expected)


@needs_packing
def test_a_weight_recomputed_by_a_pre_hook_is_not_packed():
    from torch.nn.utils import prune

    from srppo_trl.models.contiguous_lm_head import contiguous_lm_head_input

    pruned = nn.Linear(8, 6).to(torch.bfloat16)
    prune.random_unstructured(pruned, "weight", amount=0.5)  # weight = weight_orig * mask, recomputed by a pre-hook
    head = nn.Linear(8, 6).to(torch.bfloat16)
    model = nn.ModuleDict({"pruned": pruned, "head": head})
    model.get_output_embeddings = lambda: head
    with contiguous_lm_head_input([model]), torch.no_grad():  # the trainer's pre-hook on the head changes no weight
        with linears_packed_for_generation(list(model.modules())):
            assert _packed(model) == ["head"]


@needs_packing
def test_a_lora_layer_whose_base_is_already_packed_is_not_merged(tokenizer):
    model = _lora(tokenizer).eval()
    ids = torch.randint(3, len(tokenizer), (2, 6))
    expected = _bf16_logits(model, ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with linears_packed_for_generation(list(model.modules())):  # packing first: the bases, unmerged
            with lora_merged_for_generation(model, dtype=torch.bfloat16) as merged:
                assert not merged  # merging now would leave the adapter out of the packed bases
                logits = model(ids).logits
    _same_logits(logits, expected)


# ---------------------------------------------------------------------------------------------- the trainer


def _rollout(trainer, monkeypatch, pack: bool, seed=0):
    """The trainer's rollout of 8 prompts; how many packed products it ran, how many weights it packed, and how many
    forward passes of the policy generation made."""
    import srppo_trl.trainer.packed_linear as module

    trainer.args.pack_linears_for_generation = pack
    batch = trainer._collate([trainer.train_dataset[i] for i in range(8)])
    products, packs, passes = [], [], []
    original_product, original_pack = module.packed_linear, module.pack_weight
    monkeypatch.setattr(module, "packed_linear", lambda *args: products.append(1) or original_product(*args))
    monkeypatch.setattr(module, "pack_weight", lambda *args: packs.append(1) or original_pack(*args))
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    hook = policy.get_output_embeddings().register_forward_hook(lambda *a: passes.append(1))
    torch.manual_seed(seed)
    try:
        with trainer._forward_hooks():
            response = trainer.generate_rollouts(batch)["response"]
    finally:
        hook.remove()
        monkeypatch.setattr(module, "packed_linear", original_product)
        monkeypatch.setattr(module, "pack_weight", original_pack)
    return response, len(products), len(packs), len(passes)


@needs_packing
@pytest.mark.parametrize("single_base", [False, True])
def test_bf16_rollouts_multiply_by_packed_weights_and_sample_the_same_tokens(
    cpu_bf16, tokenizer, tmp_path, single_base, monkeypatch
):
    if single_base:
        trainer = tiny_single_base_trainer(tokenizer, tmp_path, _lora(tokenizer), bf16=True)
    else:
        trainer = tiny_srppo_trainer(tokenizer, tmp_path, bf16=True)
    assert trainer.args.pack_linears_for_generation  # the default
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    linears = 2 * 7 + 1  # two decoder layers of q, k, v, o, gate, up, down, and the LM head
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    packed, products, packs, passes = _rollout(trainer, monkeypatch, pack=True)
    assert products == linears * passes  # every linear of every forward pass ran packed
    assert packs == linears  # all packed once, at the first rollout
    again, _, packs_again, _ = _rollout(trainer, monkeypatch, pack=True)
    # Single-base: the frozen linears (k, o, gate, down and the LM head) come packed from the run's cache; the LoRA
    # layers (q, v, up), merged afresh, are packed again. Four models: the trained policy is packed at every rollout.
    assert packs_again == (2 * 3 if single_base else linears)
    unpacked, no_products, no_packs, _ = _rollout(trainer, monkeypatch, pack=False)
    assert no_products == no_packs == 0
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert _packed(policy) == []
    if not _packing_is_exact_here():
        pytest.skip("oneDNN's packed product rounds differently from F.linear on this CPU: tokens may differ")
    assert torch.equal(packed, unpacked) and torch.equal(again, unpacked)


def test_fp32_rollouts_are_not_packed(tokenizer, tmp_path, monkeypatch):
    trainer = tiny_srppo_trainer(tokenizer, tmp_path)
    _, products, packs, passes = _rollout(trainer, monkeypatch, pack=True)
    assert passes > 0 and products == packs == 0
