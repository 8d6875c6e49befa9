"""The pipeline's single-base mode (`single_base: true`) on tiny models: the SFT stage trains a LoRA adapter, stage 2
puts the policy and critic adapters on the same base object (no second copy of the base weights), checkpoints hold
adapters only and resume exactly, the report compares the SFT adapter with the policy, and what cannot combine is
refused before SFT.

Shrunk as in test_recipes.py: the min-overlap recipe's YAML with 1 SFT step, rollout buffers of 4 prompts, 8-token
responses, 2-4 optimizer steps, fp32, LoRA rank 4 on q_proj/v_proj (a Mistral-size run uses rank 16-64).
"""

import gc
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GenerationMixin, PreTrainedModel

from srppo_trl.models.single_base import CRITIC_ADAPTER, POLICY_ADAPTER, SFT_ADAPTER
from srppo_trl.pipeline.run import PipelineArguments, main, parse_args
from srppo_trl.pipeline.single_base import build_single_base_models, check_single_base_run
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer.srppo_trainer import SRPPOTrainer


RECIPES = Path(__file__).parents[2] / "recipes"
FIXTURES = Path(__file__).parents[1] / "fixtures"
CONFIG = str(RECIPES / "configs" / "mistral_min_overlap.yaml")


def _argv(base, output_dir, *extra):
    return [
        "--model_name_or_path", str(base), "--output_dir", str(output_dir), "--single_base", "true",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
        "--tulu_source", str(FIXTURES / "tulu_v2_sample.jsonl"),
        "--ultrafeedback_source", str(FIXTURES / "ultrafeedback_sample.jsonl"),
        "--gpt4_num_samples", "5", "--num_prompts", "8", "--eval_num_prompts", "2", "--eval_num_samples", "2",
        "--sft_max_steps", "1", "--sft_per_device_train_batch_size", "2", "--sft_learning_rate", "1e-3",
        "--sft_max_length", "128", "--rollout_batch_size", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--response_length", "8", "--learning_rate", "1e-3",
        "--critic_learning_rate", "1e-3", "--max_prompt_length", "256", "--critic_warmup_steps", "0",
        "--local_rollout_forward_batch_size", "4", "--per_device_eval_batch_size", "2", "--bf16", "false",
        "--dtype", "float32", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        *extra,
    ]  # fmt: skip


def _live_models(path) -> list:
    """The causal LMs alive now that were loaded from `path` (the base, which every SFT stage loads too)."""
    gc.collect()
    return [
        o for o in gc.get_objects()
        if isinstance(o, PreTrainedModel) and isinstance(o, GenerationMixin)  # not their inner backbones
        and str(getattr(o.config, "_name_or_path", "")) == str(path)
    ]  # fmt: skip


@pytest.fixture()
def captured(monkeypatch):
    """Records the stage-2 trainer, the models alive when it starts training, and what `train` was given."""
    seen = {}
    original = SRPPOTrainer.train

    def train(self, *args, **kwargs):
        seen.update(trainer=self, kwargs=kwargs, live=len(_live_models(seen["base"])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SRPPOTrainer, "train", train)
    return seen


def test_single_base_pipeline_trains_an_sft_adapter_and_puts_every_role_on_one_base(
    tiny_base, tmp_path, captured, monkeypatch
):
    import srppo_trl.pipeline.run as pipeline

    captured["base"] = tiny_base
    offline = []  # (row, active adapter) of each offline-benchmark call; the benchmark itself is not run
    monkeypatch.setattr(pipeline, "offline_scores", lambda m, t, n: offline.append(m.active_adapter) or {"ifeval": 0})
    result = main(_argv(tiny_base, tmp_path, "--offline_eval_n", "1"), default_config=CONFIG)

    # Stage 1 wrote a trained LoRA adapter (B starts at 0: non-zero means SFT moved it), no full weights.
    sft = Path(result["sft_model"])
    assert sorted(p.name for p in sft.glob("*.safetensors")) == ["adapter_model.safetensors"]
    sft_weights = load_file(sft / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sft_weights.items())

    # Stage 2: policy, reward (SFT and PT) and critic are views of one PEFT model over one base object.
    trainer = captured["trainer"]
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    critic = trainer.accelerator.unwrap_model(trainer.model).value_model
    assert isinstance(policy, PeftModel) and set(policy.peft_config) == {POLICY_ADAPTER, SFT_ADAPTER, CRITIC_ADAPTER}
    assert trainer.reward_model.single_base and trainer.reward_model.sft_model is policy
    assert critic.peft_model is policy and trainer.ref_model is policy and trainer.ref_is_reward_sft
    assert critic.top_layers is None  # critic_top_layers unset: the critic trains every layer
    # No second copy of the base weights: one model loaded from the base folder is alive when training starts (the
    # SFT stage's was freed), and the base tensors of every role are the same storage.
    assert captured["live"] == 1
    base_numel = sum(p.numel() for p in tiny_causal_lm(tiny_tokenizer(), seed=0).parameters())
    seen = {}
    for module in (policy, critic, trainer.reward_model, trainer.ref_model):
        for name, param in module.named_parameters():
            if "lora_" not in name and not name.startswith("score."):
                seen[param.data_ptr()] = param.numel()
    assert sum(seen.values()) == base_numel

    # Saved: adapters only (policy at the root, SFT and critic in sub-folders); the SFT adapter is unchanged.
    srppo = Path(result["srppo_model"])
    assert (srppo / "adapter_model.safetensors").exists() and not list(srppo.glob("model*.safetensors"))
    saved_sft = load_file(srppo / SFT_ADAPTER / "adapter_model.safetensors")
    assert saved_sft.keys() == sft_weights.keys() and all(torch.equal(saved_sft[k], sft_weights[k]) for k in saved_sft)
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(srppo))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits)

    # The report: SFT vs SRPPO on the held-out prompts; the SFT row's benchmark ran with the SFT adapter active.
    assert offline == [POLICY_ADAPTER, SFT_ADAPTER]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == {"SFT", "SRPPO"} and saved["pipeline"]["single_base"] is True
    assert "eval_objective/coherent_reward" in saved["results"]["SRPPO"]
    assert saved["sample_rewards"]["SFT"]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # SFT vs itself
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| metric | SFT | SRPPO |") and "| coherent reward |" in table


def test_single_base_pipeline_checkpoints_adapters_only_and_resumes_exactly(tiny_base, tmp_path, captured):
    captured["base"] = tiny_base
    save = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_num_prompts", "0"]
    # resume_from_checkpoint true on a first run (nothing to resume yet) starts from scratch: rerun-after-crash safe.
    straight = main(
        _argv(tiny_base, tmp_path / "straight", *save, "--resume_from_checkpoint", "true"), default_config=CONFIG
    )
    assert captured["kwargs"] == {"resume_from_checkpoint": None}
    checkpoint = tmp_path / "straight" / "srppo" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and not list(checkpoint.glob("model*.safetensors"))
    critic_keys = load_file(checkpoint / "value_model" / "model.safetensors").keys()
    assert critic_keys and all("lora_" in k or k.startswith("score.") for k in critic_keys)

    # A run stopped after checkpoint-2: its SFT adapter and that checkpoint. The same command with
    # resume_from_checkpoint true reuses the adapter and ends with the uninterrupted run's weights.
    import shutil

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "sft", resumed_dir / "sft")
    shutil.copytree(checkpoint, resumed_dir / "srppo" / "checkpoint-2")
    resumed = main(_argv(tiny_base, resumed_dir, *save, "--resume_from_checkpoint", "true"), default_config=CONFIG)
    assert captured["kwargs"] == {"resume_from_checkpoint": str(resumed_dir / "srppo" / "checkpoint-2")}
    assert captured["trainer"].state.global_step == 4
    for name in ("adapter_model.safetensors", f"{CRITIC_ADAPTER}/adapter_model.safetensors"):
        a = load_file(Path(straight["srppo_model"]) / name)
        b = load_file(Path(resumed["srppo_model"]) / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key} differs")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm": "grpo"}, "single_base supports algorithm ppo only"),
        ({"reward_model": "some/rm"}, "single_base needs the coherent reward"),
        ({"single_base": False, "critic_top_layers": 2}, "critic_top_layers is a single-base option"),
        ({"critic_top_layers": 0}, "critic_top_layers must be >= 1"),
    ],
)
def test_what_single_base_cannot_combine_is_refused_with_the_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        PipelineArguments(**{"single_base": True, **overrides})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "under DeepSpeed ZeRO-3"),
        ({"ACCELERATE_USE_FSDP": "true"}, "under FSDP"),
    ],
)
def test_sharded_training_is_refused_before_sft(env, message, tiny_base, tmp_path, monkeypatch):
    pipe, srppo_args, model_args = parse_args(_argv(tiny_base, tmp_path), default_config=CONFIG)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from srppo_trl.pipeline.run import run_pipeline

    with pytest.raises(ValueError, match=message):
        run_pipeline(pipe, srppo_args, model_args)
    assert not (tmp_path / "sft").exists()


def test_a_full_sft_model_is_refused_and_lora_is_turned_on(tiny_base, tmp_path):
    pipe, srppo_args, model_args = parse_args(
        _argv(tiny_base, tmp_path, "--sft_model", str(tiny_base)), default_config=CONFIG
    )
    with pytest.raises(ValueError, match="needs sft_model to be a LoRA adapter folder"):
        check_single_base_run(pipe, srppo_args, model_args)
    pipe.sft_model = None
    model_args.use_peft = False
    check_single_base_run(pipe, srppo_args, model_args)
    assert model_args.use_peft  # single-base mode is LoRA: ModelConfig's lora_* fields apply


def _saved_sft_adapter(folder, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(tiny_tokenizer(), seed=0).to(dtype)
    base.save_pretrained(folder / "base")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder / "sft")
    return str(folder / "base"), str(folder / "sft")


def test_critic_top_layers_reaches_the_critic(tmp_path):
    base, sft = _saved_sft_adapter(tmp_path)
    pipe = PipelineArguments(single_base=True, critic_top_layers=1)
    _, _, critic = build_single_base_models(pipe, type("A", (), {"fp16": False})(), sft, base, {})
    assert critic.top_layers == 1 and critic.shared_lower_layers is not None


def test_fp16_training_gets_fp32_trainable_weights(tmp_path):
    # fp16 mixed precision (T4) unscales gradients with a GradScaler, which refuses fp16 ones: the value head of an
    # fp16 base must train in fp32 (the LoRA weights are fp32 already).
    base, sft = _saved_sft_adapter(tmp_path, torch.float16)
    policy, _, critic = build_single_base_models(
        PipelineArguments(single_base=True), type("A", (), {"fp16": True})(), sft, base, {"dtype": torch.float16}
    )
    trainable = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert next(p for n, p in policy.named_parameters() if "lora_" not in n).dtype == torch.float16  # base stays
    values = critic(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).logits
    assert values.dtype == torch.float32 and torch.isfinite(values).all()


def test_later_sft_stages_train_the_same_adapter_and_sft_model_reuses_it(tiny_base, tmp_path):
    # The medium setting has two SFT stages (TULU, then the GPT-4 answers): the second goes on training the first's
    # adapter. Then a run given that adapter as sft_model skips SFT and puts it on the base unchanged.
    medium = str(RECIPES / "configs" / "llama3_medium_overlap.yaml")
    argv = _argv(tiny_base, tmp_path / "sft_only", "--skip_srppo", "true")
    result = main(argv, default_config=medium)
    first, final = tmp_path / "sft_only" / "sft" / "0-tulu", Path(result["sft_model"])
    a, b = load_file(first / "adapter_model.safetensors"), load_file(final / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # stage 2 moved stage 1's adapter
    assert not list(final.glob("model*.safetensors")) and result["srppo_model"] is None

    result = main(_argv(tiny_base, tmp_path / "rl", "--sft_model", str(final)), default_config=CONFIG)
    assert result["sft_model"] == str(final) and not (tmp_path / "rl" / "sft").exists()
    used = load_file(Path(result["srppo_model"]) / SFT_ADAPTER / "adapter_model.safetensors")
    assert used.keys() == b.keys() and all(torch.equal(used[k], b[k]) for k in b)
