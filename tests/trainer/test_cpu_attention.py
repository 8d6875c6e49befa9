"""bf16 attention on a CPU with its backward in fp32 (`trainer/cpu_attention.py`).

The forward must be PyTorch's own, bit for bit (under autocast too, whose casts it repeats); the gradients must be at
least as close to fp32 attention's as those of PyTorch's bf16 kernel; every call it does not apply to must reach
PyTorch untouched; and the trainer must use it exactly for bf16 runs on a CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from srppo_trl.testing import tiny_causal_lm, tiny_srppo_trainer, tiny_tokenizer
from srppo_trl.trainer import cpu_attention
from srppo_trl.trainer.cpu_attention import SHORT_QUERY_LENGTH, fp32_attention_backward, sdpa_with_fp32_backward


def _inputs(length=23, batch=2, heads=3, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, 16, generator=g) for _ in range(3))
    grad = torch.randn(batch, heads, length, 16, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], grad.to(dtype)


def _padding_mask(batch, length):
    """Causal, with the first rows of the first sequence left-padded (each padded query still sees itself)."""
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    mask[0, :, :, :4] = False
    mask[0, :, :4, :4] |= torch.eye(4, dtype=torch.bool)
    return mask


def _run(fn, qkv, grad, **kwargs):
    for t in qkv:
        t.grad = None
    out = fn(*qkv, **kwargs)
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in qkv]


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("masking", ["bool", "additive", "causal"])
def test_same_forward_bit_for_bit_and_gradients_no_less_exact(masking):
    qkv, grad = _inputs()
    bool_mask = _padding_mask(2, 23)
    if masking == "bool":
        kwargs = {"attn_mask": bool_mask}
    elif masking == "additive":
        kwargs = {"attn_mask": torch.zeros(bool_mask.shape).masked_fill(~bool_mask, -torch.inf).bfloat16()}
    else:
        kwargs = {"is_causal": True}
    theirs, their_grads = _run(F.scaled_dot_product_attention, qkv, grad, **kwargs)
    ours, our_grads = _run(sdpa_with_fp32_backward, qkv, grad, **kwargs)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    # fp32 attention on the same (bf16-rounded) inputs is the reference.
    exact_qkv = [t.detach().float().requires_grad_() for t in qkv]
    exact_kwargs = dict(kwargs)
    if masking == "additive":
        exact_kwargs["attn_mask"] = kwargs["attn_mask"].float()
    _, exact_grads = _run(F.scaled_dot_product_attention, exact_qkv, grad.float(), **exact_kwargs)
    for mine, bf16_kernel, exact in zip(our_grads, their_grads, exact_grads):
        assert mine.dtype == torch.bfloat16
        assert not torch.equal(mine, bf16_kernel)  # the backward did run elsewhere
        assert _rel_err(mine, exact) <= _rel_err(bf16_kernel, exact) * 1.02 + 1e-4
        assert _rel_err(mine, exact) < 0.02


def test_under_autocast_the_same_casts_forward_and_gradients_of_fp32_inputs():
    """transformers hands SDPA fp32 queries and keys (rotary embeddings in fp32) and bf16 values under autocast."""
    (q, k, v), grad = _inputs()
    q, k = (t.detach().float().requires_grad_() for t in (q, k))
    mask = _padding_mask(2, 23)
    results = []
    for fn in (F.scaled_dot_product_attention, sdpa_with_fp32_backward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(fn, [q, k, v], grad, attn_mask=mask))
    (theirs, their_grads), (ours, our_grads) = results
    assert torch.equal(ours, theirs)
    assert [g.dtype for g in our_grads] == [torch.float32, torch.float32, torch.bfloat16]  # back to the inputs' dtypes
    # fp32 attention on the inputs as autocast rounds them is the reference.
    exact_qkv = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    _, exact_grads = _run(F.scaled_dot_product_attention, exact_qkv, grad.float(), attn_mask=mask)
    for mine, bf16_kernel, exact in zip(our_grads, their_grads, exact_grads):
        assert not torch.equal(mine, bf16_kernel)  # the backward did run elsewhere
        assert _rel_err(mine, exact) <= _rel_err(bf16_kernel, exact) * 1.02 + 1e-4


def test_under_fp16_autocast_pytorch_runs_it():
    """fp16 autocast runs the kernel in fp16: PyTorch's call, whatever the inputs' dtype."""
    qkv, grad = _inputs()
    with torch.autocast("cpu", dtype=torch.float16):
        theirs = F.scaled_dot_product_attention(*qkv, is_causal=True)
        ours = sdpa_with_fp32_backward(*qkv, is_causal=True)
    assert ours.dtype == theirs.dtype == torch.float16 and torch.equal(ours, theirs)


def test_a_double_backward_fails_loudly():
    qkv, _ = _inputs()
    out = sdpa_with_fp32_backward(*qkv, is_causal=True)
    assert out.grad_fn is not None and "FlashForwardFp32Backward" in type(out.grad_fn).__name__
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.float().sum(), qkv[0], create_graph=True)


@pytest.mark.parametrize(
    "case",
    ["fp32", "no_grad", "long", "dropout", "gqa", "math_backend", "not_trained", "trained_bias", "compiling"],
)
def test_calls_it_does_not_apply_to_reach_pytorch_untouched(case, monkeypatch):
    length = SHORT_QUERY_LENGTH if case == "long" else 9
    qkv, grad = _inputs(length=length, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    kwargs = {}
    if case == "dropout":
        kwargs["dropout_p"] = 0.5
    if case == "gqa":
        qkv[1], qkv[2] = (t.detach()[:, :1].requires_grad_() for t in qkv[1:])
        kwargs["enable_gqa"] = True
    if case == "not_trained":
        qkv = [t.detach() for t in qkv]
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if case == "trained_bias":
        kwargs["attn_mask"] = torch.zeros(1, 1, length, length, dtype=torch.bfloat16, requires_grad=True)
    applied = []
    monkeypatch.setattr(
        cpu_attention._FlashForwardFp32Backward, "apply", lambda *a: applied.append(a) or pytest.fail("applied")
    )
    with fp32_attention_backward():
        if case == "no_grad":
            with torch.no_grad():
                F.scaled_dot_product_attention(*qkv)
        elif case == "math_backend":
            with sdpa_kernel(SDPBackend.MATH):
                F.scaled_dot_product_attention(*qkv)
        else:
            F.scaled_dot_product_attention(*qkv, **kwargs)
    assert applied == []


def test_the_patch_is_counted_and_undone_even_after_an_error():
    original = F.scaled_dot_product_attention
    with fp32_attention_backward():
        assert F.scaled_dot_product_attention is sdpa_with_fp32_backward
        with pytest.raises(RuntimeError, match="boom"), fp32_attention_backward():
            raise RuntimeError("boom")
        assert F.scaled_dot_product_attention is sdpa_with_fp32_backward  # the outer one still holds
    assert F.scaled_dot_product_attention is original


def test_another_librarys_patch_is_left_in_place_and_no_call_recurses(monkeypatch):
    original = F.scaled_dot_product_attention

    def theirs(*args, **kwargs):
        return original(*args, **kwargs)

    with fp32_attention_backward():
        monkeypatch.setattr(F, "scaled_dot_product_attention", theirs)  # patched over ours, restored after the test
    assert F.scaled_dot_product_attention is theirs
    # Called with no patch active (or put back by someone else out of order): PyTorch's function, no recursion.
    qkv, grad = _inputs()
    ours, _ = _run(sdpa_with_fp32_backward, qkv, grad, is_causal=True)
    assert torch.equal(ours, original(*qkv, is_causal=True))


def test_a_model_under_it_gives_the_same_logits_and_close_gradients():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=3)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the mask reaches SDPA

    def run(patched):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if patched:
                with fp32_attention_backward():
                    logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
        torch.log_softmax(logits.float(), -1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    original_apply = cpu_attention._FlashForwardFp32Backward.apply
    cpu_attention._FlashForwardFp32Backward.apply = lambda *a: calls.append(1) or original_apply(*a)
    try:
        ours, our_grads = run(True)
    finally:
        cpu_attention._FlashForwardFp32Backward.apply = original_apply
    theirs, their_grads = run(False)
    assert len(calls) == model.config.num_hidden_layers  # every layer's attention took it
    assert torch.equal(ours, theirs)
    for name, g in their_grads.items():
        assert _rel_err(our_grads[name], g) < 0.05, name


def test_the_trainer_uses_it_for_bf16_runs_on_a_cpu_only(cpu_bf16, tmp_path):
    tokenizer = tiny_tokenizer()
    assert tiny_srppo_trainer(tokenizer, tmp_path / "bf16", bf16=True)._fp32_attention_backward
    assert not tiny_srppo_trainer(tokenizer, tmp_path / "fp32", bf16=False)._fp32_attention_backward
    off = tiny_srppo_trainer(tokenizer, tmp_path / "off", bf16=True, cpu_attention_fp32_backward=False)
    assert not off._fp32_attention_backward


def test_a_bf16_run_takes_it_in_its_trained_passes_and_leaves_the_function_as_it_was(cpu_bf16, tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    original = F.scaled_dot_product_attention
    applied = []
    original_apply = cpu_attention._FlashForwardFp32Backward.apply
    monkeypatch.setattr(
        cpu_attention._FlashForwardFp32Backward, "apply", lambda *a: applied.append(1) or original_apply(*a)
    )
    trainer = tiny_srppo_trainer(tokenizer, tmp_path, bf16=True, max_steps=1)
    trainer.train()
    assert applied
    assert F.scaled_dot_product_attention is original


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_bf16_run_with_activation_checkpointing_takes_it_in_the_recomputed_forwards(
    cpu_bf16, tmp_path, monkeypatch, reentrant
):
    """The checkpointed forward is recomputed during the backward, inside the training step: it must take the same
    path, or non-reentrant checkpointing fails on the mismatch (and reentrant silently falls back)."""
    tokenizer = tiny_tokenizer()
    applied = []
    original_apply = cpu_attention._FlashForwardFp32Backward.apply
    monkeypatch.setattr(
        cpu_attention._FlashForwardFp32Backward, "apply", lambda *a: applied.append(1) or original_apply(*a)
    )
    trainer = tiny_srppo_trainer(
        tokenizer,
        tmp_path,
        bf16=True,
        max_steps=1,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    trainer.train()
    layers = trainer.accelerator.unwrap_model(trainer.model).policy.config.num_hidden_layers
    # Policy and critic, every layer: the recomputation in the backward, and (non-reentrant checkpointing, whose
    # first forward keeps gradients on; reentrant runs it without) the forward.
    assert len(applied) >= (1 if reentrant else 2) * 2 * layers
