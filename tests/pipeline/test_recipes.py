"""Every paper recipe parses, builds its data from local files in the real schema, and runs SFT + two SRPPO steps.

The YAML files keep the paper's numbers; the overrides below shrink them for a tiny model on CPU: 1 SFT step per stage
(paper: 2 epochs of batch 128), rollout buffers of 4 prompts (paper: 1024), 8-token responses (paper: up to 1024),
2 optimizer steps, fp32 and no bf16 (no GPU here), no wandb.
"""

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForSequenceClassification, LlamaConfig

from srppo_trl.pipeline.run import PipelineArguments, base_model_name, main, parse_args
from srppo_trl.testing import tiny_tokenizer


RECIPES = Path(__file__).parents[2] / "recipes"
FIXTURES = Path(__file__).parents[1] / "fixtures"
PAPER_RECIPES = sorted(
    p.stem for p in (RECIPES / "configs").glob("*.yaml") if not p.stem.startswith("smollm2") and "spin" not in p.stem
)  # SPIN recipes: tests/pipeline/test_spin.py


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_rm")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def _overrides(base, output_dir):
    return [
        "--model_name_or_path", str(base), "--output_dir", str(output_dir),
        "--tulu_source", str(FIXTURES / "tulu_v2_sample.jsonl"),
        "--ultrafeedback_source", str(FIXTURES / "ultrafeedback_sample.jsonl"),
        "--gpt4_num_samples", "5", "--extra_tulu_num_samples", "5", "--num_prompts", "8", "--eval_num_prompts", "2",
        "--sft_max_steps", "1", "--sft_per_device_train_batch_size", "2", "--sft_gradient_accumulation_steps", "1",
        "--sft_max_length", "128", "--rollout_batch_size", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--response_length", "8",
        "--max_prompt_length", "256", "--critic_warmup_steps", "0", "--local_rollout_forward_batch_size", "4",
        "--per_device_eval_batch_size", "2", "--bf16", "false", "--dtype", "float32",
        "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
    ]  # fmt: skip


def test_recipes_keep_the_papers_hyper_parameters():
    for name in ("mistral_min_overlap", "llama3_medium_overlap", "mistral_diminished_overlap"):
        config = yaml.safe_load((RECIPES / "configs" / f"{name}.yaml").read_text())
        assert config["rollout_batch_size"] == 1024
        assert config["kl_coef"] == 0.2 and config["cliprange"] == 0.2
        assert config["critic_learning_rate"] == 9.0e-6 and config["critic_warmup_steps"] == 35
        assert config["learning_rate"] == 5.0e-8 and config["num_train_epochs"] == 2
        assert config["sft_num_train_epochs"] == 2
        # train batch 128 on the 8 processes of the accelerate configs
        assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * 8 == 128
        assert (RECIPES / f"{name}.py").exists()


def test_single_base_qlora_recipe_is_the_min_overlap_setting_on_one_gpu():
    full = yaml.safe_load((RECIPES / "configs" / "mistral_min_overlap.yaml").read_text())
    qlora = yaml.safe_load((RECIPES / "configs" / "mistral_min_overlap_qlora.yaml").read_text())
    assert qlora["single_base"] and qlora["use_peft"] and qlora["load_in_4bit"]
    same = ("model_name_or_path", "setting", "rollout_batch_size", "kl_coef", "cliprange", "critic_learning_rate",
            "critic_warmup_steps", "num_train_epochs", "sft_num_train_epochs", "response_length", "reward_clip")  # fmt: skip
    assert {k: qlora[k] for k in same} == {k: full[k] for k in same}
    # the paper's train batch 128 in one process
    assert qlora["per_device_train_batch_size"] * qlora["gradient_accumulation_steps"] == 128
    assert qlora["sft_per_device_train_batch_size"] * qlora["sft_gradient_accumulation_steps"] == 128
    assert (RECIPES / "mistral_min_overlap_qlora.py").exists()


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_parses_with_its_config(name):
    # bf16 is refused on a machine without a bf16 GPU (this one): the rest of the YAML is parsed as written.
    pipe, srppo_args, model_args = parse_args(
        ["--bf16", "false"], default_config=str(RECIPES / "configs" / f"{name}.yaml")
    )
    assert pipe.setting in ("min", "medium", "diminished")
    assert srppo_args.rollout_batch_size == 1024
    assert base_model_name(pipe, model_args) == model_args.model_name_or_path != "smollm2"


def test_model_name_or_path_on_the_command_line_replaces_the_recipes_model():
    config = str(RECIPES / "configs" / "mistral_min_overlap.yaml")
    pipe, _, model_args = parse_args(["--bf16", "false", "--model_name_or_path", "my/model"], default_config=config)
    assert base_model_name(pipe, model_args) == "my/model"
    pipe, _, model_args = parse_args(["--bf16", "false", "--base_model", "my/model"], default_config=config)
    with pytest.raises(ValueError, match="drop base_model"):
        base_model_name(pipe, model_args)


def test_base_model_and_model_name_or_path_are_one_setting():
    assert base_model_name(PipelineArguments()) == "smollm2"
    assert base_model_name(PipelineArguments(base_model="a/b")) == "a/b"
    assert base_model_name(PipelineArguments(base_model="a/b"), type("M", (), {"model_name_or_path": "a/b"})) == "a/b"


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_recipe_runs_end_to_end_on_tiny_models(name, tiny_base, tiny_reward_model, tmp_path):
    argv = _overrides(tiny_base, tmp_path)
    if "preference_rm" in name:
        argv += ["--reward_model", str(tiny_reward_model)]
    config = yaml.safe_load((RECIPES / "configs" / f"{name}.yaml").read_text())
    if config.get("load_in_4bit"):
        argv += ["--load_in_4bit", "false"]  # bitsandbytes' 4-bit needs CUDA: the LoRA half of QLoRA here
    result = main(argv, default_config=str(RECIPES / "configs" / f"{name}.yaml"))
    stages = {"min": 1, "medium": 2, "diminished": 3}[config["setting"]]
    # Single-base mode saves adapters only (SFT's and, below, the policy's); full weights otherwise.
    weights = "adapter_model.safetensors" if config.get("single_base") else "model.safetensors"
    assert (Path(result["sft_model"]) / weights).exists()
    if not config.get("single_base"):
        assert json.loads((Path(result["sft_model"]) / "config.json").read_text())["use_cache"] is True
    assert not (Path(result["sft_model"]) / "training_args.bin").exists()
    assert len([p for p in (tmp_path / "sft").iterdir() if p.is_dir() and not p.name.endswith(".tmp")]) == stages
    saved = json.loads((tmp_path / "results.json").read_text())
    if config.get("skip_srppo"):
        assert saved["srppo_model"] is None
        return
    assert (tmp_path / "srppo" / weights).exists()
    assert {"SFT", "SRPPO"} == set(saved["results"])
    assert "eval_completions/mean_length" in saved["results"]["SRPPO"]
    # Sampled held-out rewards with intervals, SFT and SRPPO on the same prompts (2 prompts x 4 samples here).
    samples = saved["sample_rewards"]
    for row in ("SFT", "SRPPO"):
        low, high = samples[row]["reward_ci95"]
        assert low <= samples[row]["reward_mean"] <= high and len(samples[row]["per_prompt_reward"]) == 2
    assert "SRPPO - SFT" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_pipeline_runs_trl_group_algorithms_with_the_coherent_reward(algorithm, tiny_base, tmp_path):
    argv = _overrides(tiny_base, tmp_path) + ["--algorithm", algorithm, "--per_device_train_batch_size", "4"]
    argv += ["--rollout_batch_size", "4"]
    result = main(argv, default_config=str(RECIPES / "configs" / "mistral_min_overlap.yaml"))
    assert (Path(result["srppo_model"]) / "model.safetensors").exists()


def test_model_revision_reaches_every_load_of_the_base_model(tiny_base, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(path, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, str(path), kwargs.get("revision")))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    argv = _overrides(tiny_base, tmp_path) + [
        "--model_revision",
        "v0.1",
        "--max_steps",
        "1",
        "--eval_num_prompts",
        "0",
    ]
    main(argv, default_config=str(RECIPES / "configs" / "mistral_min_overlap.yaml"))
    base_loads = [(name, revision) for name, path, revision in calls if path == str(tiny_base)]
    # the tokenizer, the SFT stage's starting model, the reward's tokenizer check and its base model p_PT
    assert sorted(name for name, _ in base_loads) == ["AutoModelForCausalLM"] * 2 + ["AutoTokenizer"] * 2
    assert all(revision == "v0.1" for _, revision in base_loads)
    assert all(revision is None for _, path, revision in calls if path != str(tiny_base))


@pytest.mark.parametrize(
    "override, message",
    [
        (["--max_prompt_length", "4"], "longer than max_prompt_length=4 tokens"),
        (["--response_length", "600", "--max_prompt_length", "1000"], "exceeds the model's context of 512 tokens"),
        (["--num_prompts", "3"], "has 3 prompts but one rollout buffer needs rollout_batch_size=4"),
    ],
)
def test_prompts_the_trainer_would_refuse_fail_before_sft(override, message, tiny_base, tmp_path, monkeypatch):
    import srppo_trl.pipeline.run as pipeline

    def no_sft(*args, **kwargs):
        raise AssertionError("SFT started before the prompts were checked")

    monkeypatch.setattr(pipeline, "run_sft", no_sft)
    with pytest.raises(ValueError, match=message):
        main(
            _overrides(tiny_base, tmp_path) + override,
            default_config=str(RECIPES / "configs" / "mistral_min_overlap.yaml"),
        )
    assert not (tmp_path / "sft").exists()


class _FakeSFTTrainer:
    """What `save_sft_model` uses of an SFTTrainer, on one process of a multi-process run."""

    def __init__(self, writer):
        from types import SimpleNamespace

        self.args = SimpleNamespace(should_save=writer)
        self.waits, self.saved = 0, []
        self.model = SimpleNamespace(config=SimpleNamespace(use_cache=False))
        self.accelerator = SimpleNamespace(wait_for_everyone=self._wait, unwrap_model=lambda model: model)

    def _wait(self):
        self.waits += 1

    def save_model(self, output_dir):
        self.saved.append(output_dir)  # every process calls it (ZeRO-3 / FSDP gather); only the writer writes
        if self.args.should_save:
            for name in ("config.json", "model.safetensors", "training_args.bin"):
                (Path(output_dir) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / name).write_text("{}")


@pytest.mark.parametrize("writer", [True, False])
def test_sft_model_is_saved_through_the_trainer_by_the_saving_process_only(writer, tmp_path):
    from srppo_trl.pipeline.run import save_sft_model

    trainer, folder = _FakeSFTTrainer(writer), tmp_path / "sft"
    save_sft_model(trainer, tokenizer=None, folder=folder)
    assert trainer.saved == [str(tmp_path / "sft.tmp")] and trainer.waits == 2
    assert trainer.model.config.use_cache is True
    assert not (tmp_path / "sft.tmp").exists()
    if writer:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    else:
        assert not folder.exists()


def test_lora_sft_is_merged_into_full_weights(tiny_base, tmp_path):
    argv = _overrides(tiny_base, tmp_path) + ["--skip_srppo", "true", "--use_peft", "true", "--lora_r", "4"]
    argv += ["--lora_target_modules", "q_proj", "v_proj"]
    result = main(argv, default_config=str(RECIPES / "configs" / "mistral_min_overlap.yaml"))
    sft = Path(result["sft_model"])
    assert (sft / "model.safetensors").exists() and not (sft / "adapter_config.json").exists()
    assert json.loads((sft / "config.json").read_text())["use_cache"] is True
    assert not list(tmp_path.glob("sft*.tmp")) and not (sft / "training_args.bin").exists()


def _group_args(tmp_path, algorithm, extra_yaml="", argv=()):
    config = tmp_path / "grpo.yaml"
    base = (RECIPES / "configs" / "mistral_min_overlap.yaml").read_text()
    config.write_text(base.replace("algorithm: ppo", f"algorithm: {algorithm}") + extra_yaml)
    return parse_args(["--bf16", "false", "--report_to", "none", *argv], default_config=str(config))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_config_takes_the_recipes_fields_and_group_trainer_extra(algorithm, tmp_path):
    from srppo_trl.pipeline.run import build_group_config

    extra = "lr_scheduler_type: cosine\nwarmup_steps: 3\ngroup_trainer_extra:\n  num_generations: 8\n  top_p: 0.9\n"
    pipe, srppo_args, _ = _group_args(tmp_path, algorithm, extra, ["--per_device_train_batch_size", "8"])
    config = build_group_config(pipe, srppo_args)
    assert type(config).__name__ == {"grpo": "GRPOConfig", "rloo": "RLOOConfig"}[algorithm]
    assert config.num_generations == 8 and config.top_p == 0.9  # group_trainer_extra
    assert config.lr_scheduler_type == "cosine" and config.warmup_steps == 3  # shared fields the old list dropped
    assert (config.learning_rate, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (
        5.0e-8, 8, 4,
    )  # fmt: skip
    assert (config.num_train_epochs, config.seed, config.logging_steps, config.save_steps) == (2, 42, 1, 64)
    assert config.activation_checkpointing is True and config.bf16 is False
    assert (config.beta, config.max_completion_length, config.temperature) == (0.2, 1024, 1.0)  # renamed


def test_group_config_refuses_a_batch_that_splits_a_prompt_group(tmp_path):
    from srppo_trl.pipeline.run import build_group_config

    # 5 x 4 accumulation steps = 20 completions per generation batch: not whole groups of 8
    pipe, srppo_args, _ = _group_args(
        tmp_path,
        "grpo",
        "group_trainer_extra: {num_generations: 8}\n",
        ["--per_device_train_batch_size", "5", "--rollout_batch_size", "960"],
    )
    with pytest.raises(ValueError, match="set per_device_train_batch_size to a multiple of 8"):
        build_group_config(pipe, srppo_args)
    pipe, srppo_args, _ = _group_args(tmp_path, "grpo", "", ["--group_trainer_extra", '{"num_generation": 4}'])
    with pytest.raises(ValueError, match=r"sets \['num_generation'\], which GRPOConfig does not have"):
        build_group_config(pipe, srppo_args)


def test_a_group_batch_that_splits_a_prompt_group_fails_before_sft(tiny_base, tmp_path, monkeypatch):
    import srppo_trl.pipeline.run as pipeline

    monkeypatch.setattr(pipeline, "run_sft", lambda *args, **kwargs: pytest.fail("SFT started"))
    argv = _overrides(tiny_base, tmp_path) + ["--algorithm", "grpo", "--group_trainer_extra", '{"num_generations": 3}']
    with pytest.raises(ValueError, match="num_generations=3 completions per prompt"):
        main(argv, default_config=str(RECIPES / "configs" / "mistral_min_overlap.yaml"))
