"""CPU bf16: detected from the CPU's flags; `bf16=True` refused with one sentence on a CPU without them."""

import platform

import pytest

from srppo_trl import SRPPOConfig
from srppo_trl.trainer import precision


X86_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    "machine,cpuinfo,expected",
    [
        ("x86_64", X86_AMX, ["avx512_bf16", "amx_bf16"]),
        ("x86_64", X86_AVX512_BF16, ["avx512_bf16"]),
        ("x86_64", X86_AVX2, []),
        ("x86_64", ARM_BF16, []),  # an Arm word on x86 is not an x86 flag
        ("aarch64", ARM_BF16, ["bf16"]),
        ("aarch64", X86_AVX2, []),
    ],
)
def test_bf16_cpu_flags(monkeypatch, machine, cpuinfo, expected):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert precision.bf16_cpu_flags(cpuinfo) == expected


def _cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("SRPPO_ALLOW_SLOW_CPU_BF16", raising=False)


def test_bf16_refused_on_a_cpu_without_bf16_instructions(monkeypatch, tmp_path):
    _cpu_without_bf16(monkeypatch)
    with pytest.raises(ValueError, match=r"bf16=True on a CPU without bf16 instructions \(no avx512_bf16 or amx_bf16"):
        SRPPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")


def test_bf16_allowed_on_a_cpu_with_bf16_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    config = SRPPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    assert config.bf16


def test_fp32_never_refused_and_cpu_default_stays_fp32(monkeypatch, tmp_path):
    _cpu_without_bf16(monkeypatch)
    assert not SRPPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none").bf16
    assert not SRPPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16


def test_gpu_runs_are_not_judged_by_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    precision.check_cpu_bf16(True, on_cpu=False)  # a GPU run: the CPU's flags do not matter


def test_bf16_on_a_cpu_with_bf16_runs_on_the_cpu(monkeypatch, tmp_path):
    """TrainingArguments refuses bf16 without a GPU unless `use_cpu`: SRPPOConfig sets it for a CPU run."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    config = SRPPOConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert config.bf16 and config.use_cpu
    assert config.device.type == "cpu"


def test_the_environment_can_allow_bf16_on_any_cpu(monkeypatch, tmp_path):
    _cpu_without_bf16(monkeypatch)
    monkeypatch.setenv("SRPPO_ALLOW_SLOW_CPU_BF16", "1")
    assert SRPPOConfig(output_dir=str(tmp_path), bf16=True, report_to="none").bf16


def test_rollouts_are_sampled_under_the_autocast_of_the_trained_passes(cpu_bf16, tmp_path):
    """With bf16=True every forward of an update, generation included, runs under bf16 autocast (the policy's own
    forward is not the one accelerate wraps): the rollouts come from the distribution whose log-probs are trained."""
    import torch

    from srppo_trl import CoherentRewardModel, SRPPOTrainer
    from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=1)
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, bf16=True, max_steps=1),
        processing_class=tokenizer,
        model=policy,
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
    )
    seen = []
    policy.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.generate_rollouts(batch)
    assert seen and all(seen)


def test_frozen_weights_cast_once_samples_the_same_tokens_and_restores_the_flags():
    """Under bf16 autocast the frozen weights are cast once per region instead of once per step: the same casts, so
    the same sampled tokens; the weights are frozen again afterwards, also after an error."""
    import torch

    from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
    from srppo_trl.trainer.precision import frozen_weights_cast_once

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=3).eval()
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # one trainable weight (a merged-adapter policy has some)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)

    def sample(cast_once):
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with frozen_weights_cast_once(model, enabled=cast_once):
                assert all(p.requires_grad for p in model.parameters()) == cast_once
                return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    assert torch.equal(sample(True), sample(False))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lm_head.weight"]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), frozen_weights_cast_once(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    with frozen_weights_cast_once(model):  # no autocast: nothing to cast, nothing marked
        assert [name for name, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
