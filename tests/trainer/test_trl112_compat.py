"""SRPPOTrainer as a drop-in for TRL 1.12's `trl.experimental.ppo.PPOTrainer` (removed in TRL 1.13).

The scenarios below are those of TRL 1.12's `tests/experimental/test_ppo_trainer.py` (basic training, PEFT training,
the masked statistics) and of its example `examples/scripts/ppo/ppo.py` (Apache-2.0, (c) the HuggingFace team),
written the way a 1.12 user writes them with only the import changed, on tiny local models saved to folders that
stand in for hub ids.
"""

import dataclasses
import json
import math
import sys

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
)

# The only change a TRL 1.12 user makes: this import instead of `from trl.experimental.ppo import ...`.
from srppo_trl import SRPPOConfig as PPOConfig
from srppo_trl import SRPPOTrainer as PPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer
from srppo_trl.trainer.ppo_math import masked_mean, masked_var, masked_whiten


# TRL 1.12's PPOConfig defaults (trl/experimental/ppo/ppo_config.py and trl/trainer/base_config.py of trl==1.12.0).
TRL112_DEFAULTS = {
    "learning_rate": 3e-6,
    "dataset_num_proc": None,
    "num_mini_batches": 1,
    "total_episodes": None,
    "local_rollout_forward_batch_size": 64,
    "num_sample_generations": 10,
    "response_length": 53,
    "stop_token": None,
    "stop_token_id": None,
    "temperature": 0.7,
    "missing_eos_penalty": None,
    "sft_model_path": "EleutherAI/pythia-160m",
    "reward_model_path": "EleutherAI/pythia-160m",
    "push_to_hub": False,
    "model_adapter_name": None,
    "ref_adapter_name": None,
    "num_ppo_epochs": 4,
    "whiten_rewards": False,
    "kl_coef": 0.05,
    "kl_estimator": "k1",
    "cliprange": 0.2,
    "vf_coef": 0.1,
    "cliprange_value": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "ds3_gather_for_generation": True,
    "logging_steps": 10,
    "gradient_checkpointing": True,
}
TRL112_DERIVED = (
    "world_size",
    "num_total_batches",
    "micro_batch_size",
    "local_batch_size",
    "batch_size",
    "local_mini_batch_size",
    "mini_batch_size",
)
# Logged by TRL 1.12's PPOTrainer.train() at every update.
TRL112_METRICS = (
    "eps",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
)


# ---------------------------------------------------------------------------------------------- tiny "hub" models


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Folders standing in for hub ids: a causal LM + tokenizer ("sft") and a one-label sequence classifier ("rm").

    Their vocabulary has room beyond the tokenizer (as hub models' padded embeddings do), so the 1.12 recipe of
    adding a `[PAD]` token works as it does on `trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`.
    """
    root = tmp_path_factory.mktemp("hub")
    tokenizer = tiny_tokenizer()
    causal = tiny_causal_lm(tokenizer, seed=1)
    causal.resize_token_embeddings(len(tokenizer) + 16)
    causal.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    config = causal.config.__class__.from_dict(causal.config.to_dict())
    config.num_labels = 1
    torch.manual_seed(5)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    data = root / "data"
    data.mkdir()
    for split, count in (("train", 16), ("test", 4)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(count):
                f.write(json.dumps({"prompt": f"Write a short poem about the number {i}."}) + "\n")
    return root


def _zen_like(tokenizer):
    """TRL 1.12 test's dataset: prompt-only, tokenized to input_ids with EOS appended, `prompt` removed."""
    raw = {
        "train": Dataset.from_dict({"prompt": [f"What is {i} plus {i}?" for i in range(16)]}),
        "test": Dataset.from_dict({"prompt": [f"List {i} fruits." for i in range(4)]}),
    }

    def tokenize(example, tokenizer):
        tokenized = tokenizer(text=example["prompt"])
        if tokenizer.eos_token_id is not None and tokenized["input_ids"][-1] != tokenizer.eos_token_id:
            tokenized["input_ids"] = tokenized["input_ids"] + [tokenizer.eos_token_id]
            tokenized["attention_mask"] = tokenized["attention_mask"] + [1]
        return tokenized

    return {k: v.map(tokenize, fn_kwargs={"tokenizer": tokenizer}, remove_columns="prompt") for k, v in raw.items()}


class _Trl112TestSetup:
    """TRL 1.12's TestPPOTrainer.setup_method, with the local folders for the hub ids."""

    def __init__(self, hub):
        self.model = AutoModelForCausalLM.from_pretrained(hub / "sft", dtype="float32")
        self.ref_model = AutoModelForCausalLM.from_pretrained(hub / "sft")
        self.tokenizer = AutoTokenizer.from_pretrained(hub / "sft", padding_side="left")
        self.tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        self.value_model = AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1)
        self.reward_model = AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1)
        self.raw_dataset = _zen_like(self.tokenizer)


# ---------------------------------------------------------------------------------------------- TRL 1.12's tests


def test_basic_training(hub, tmp_path):
    s = _Trl112TestSetup(hub)
    initial_critic_weights = {n: p.clone().detach() for n, p in s.value_model.named_parameters()}
    initial_policy_weights = {n: p.clone().detach() for n, p in s.model.named_parameters()}
    training_args = PPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        num_ppo_epochs=2,
        report_to="none",
    )
    trainer = PPOTrainer(
        args=training_args,
        processing_class=s.tokenizer,
        model=s.model,
        ref_model=s.ref_model,
        reward_model=s.reward_model,
        value_model=s.value_model,
        train_dataset=s.raw_dataset["train"],
        eval_dataset=s.raw_dataset["test"],
    )
    trainer.train()

    assert any(
        not torch.equal(initial_critic_weights[n], p.to("cpu"))
        for n, p in trainer.model.value_model.named_parameters()
    ), "Critic weights were not updated during training"
    assert any(
        not torch.equal(initial_policy_weights[n], p.to("cpu")) for n, p in trainer.model.policy.named_parameters()
    ), "Policy weights were not updated during training"
    # TRL 1.12's training length: num_train_epochs (3) x 16 prompts = 48 episodes, 12 updates of 4 prompts.
    assert training_args.total_episodes == 48 and training_args.num_total_batches == 12
    assert trainer.state.global_step == 12 * 2  # x num_ppo_epochs optimizer steps per update
    logged = {k for entry in trainer.state.log_history for k in entry}
    missing = [name for name in TRL112_METRICS if name not in logged]
    assert not missing, missing


def test_peft_training(hub, tmp_path):
    from peft import LoraConfig

    s = _Trl112TestSetup(hub)
    initial_critic_weights = {n: p.clone().detach() for n, p in s.value_model.named_parameters()}
    training_args = PPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        num_ppo_epochs=2,
        report_to="none",
    )
    peft_config = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args=training_args,
        processing_class=s.tokenizer,
        model=s.model,
        ref_model=None,
        reward_model=s.reward_model,
        value_model=s.value_model,
        train_dataset=s.raw_dataset["train"],
        eval_dataset=s.raw_dataset["test"],
        peft_config=peft_config,
    )
    trainer.train()

    assert any(
        n in initial_critic_weights and not torch.equal(initial_critic_weights[n], p.to("cpu"))
        for n, p in trainer.model.value_model.named_parameters()
    ), "Critic weights were not updated during training"
    assert any(
        "lora" in n.lower() and p.requires_grad and not torch.allclose(p, torch.zeros_like(p))
        for n, p in trainer.model.policy.named_parameters()
    ), "Policy LoRA weights were not updated during training"


def test_masked_statistics_as_trl112():
    values, mask = torch.Tensor([1, 2, 3, 4]), torch.Tensor([0, 1, 1, 0])
    unmasked = values[1:3]
    assert torch.mean(unmasked) == masked_mean(values, mask)
    assert torch.var(unmasked) == masked_var(values, mask)
    whitened = (unmasked - unmasked.mean()) * torch.rsqrt(unmasked.var() + 1e-8)
    assert abs((whitened - masked_whiten(values, mask)[1:3]).sum().item()) < 1e-5
    rows = torch.tensor([[1.0, 2.0, 9.0], [3.0, 5.0, 7.0]])
    row_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_mean(rows, row_mask, axis=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(rows, row_mask, axis=1), masked_mean(rows, row_mask, dim=1))


# ---------------------------------------------------------------------------------------------- TRL 1.12's example


def _run_trl112_example(argv):
    """examples/scripts/ppo/ppo.py of TRL 1.12, statement for statement, with only the import changed."""
    import shutil

    from accelerate import PartialState
    from datasets import load_dataset
    from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

    parser = HfArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_into_dataclasses(argv)
    shutil.rmtree(training_args.output_dir, ignore_errors=True)

    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    value_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1, **model_kwargs
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1, **model_kwargs
    )
    policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path, **model_kwargs)

    peft_config = get_peft_config(model_args)
    if peft_config is None:
        ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path, **model_kwargs)
    else:
        ref_policy = None

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )
    eval_samples = 4
    train_dataset = dataset.select(range(len(dataset) - eval_samples))
    eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))
    dataset_text_field = "prompt"

    def prepare_dataset(dataset, tokenizer):
        def tokenize(element):
            outputs = tokenizer(element[dataset_text_field], padding=False)
            return {"input_ids": outputs["input_ids"]}

        return dataset.map(
            tokenize, batched=True, remove_columns=dataset.column_names, num_proc=training_args.dataset_num_proc
        )

    with PartialState().local_main_process_first():
        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    completions = trainer.generate_completions()
    return trainer, training_args, completions


@pytest.mark.parametrize("use_peft", [False, True])
def test_trl112_example_script(hub, tmp_path, use_peft, capsys):
    out = tmp_path / "out"
    argv = [
        "--dataset_name", str(hub / "data"),
        "--dataset_train_split", "train",
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--total_episodes", "10",
        "--model_name_or_path", str(hub / "sft"),
        "--sft_model_path", str(hub / "sft"),
        "--reward_model_path", str(hub / "rm"),
        "--missing_eos_penalty", "1.0",
        "--num_ppo_epochs", "1",
        "--response_length", "8",
        "--report_to", "none",
    ]  # fmt: skip
    if use_peft:
        argv += ["--use_peft", "--lora_r", "8", "--lora_alpha", "16"]
    trainer, args, completions = _run_trl112_example(argv)

    # total_episodes drives the length: ceil(10 / 4) = 3 updates of num_ppo_epochs x num_mini_batches = 1 step each.
    assert (args.num_total_batches, args.batch_size, trainer.state.global_step) == (3, 4, 3)
    assert trainer.state.episode == 12
    saved = AutoModelForCausalLM.from_pretrained(out) if not use_peft else None
    assert use_peft or saved.config.vocab_size == trainer.model.policy.config.vocab_size
    assert (out / ("adapter_config.json" if use_peft else "config.json")).exists()
    assert list(completions.columns) == ["query", "model response", "score"] and len(completions) == 4
    assert "model response" in capsys.readouterr().out  # the printed table


# ---------------------------------------------------------------------------------------------- config


def test_star_import_works():
    namespace = {}
    exec("from srppo_trl import *", namespace)
    assert {"SRPPOConfig", "SRPPOTrainer", "CoherentRewardModel", "build_value_model"} <= set(namespace)


def test_every_trl112_config_field_exists_with_its_default(tmp_path):
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    assert not [n for n in [*TRL112_DEFAULTS, *TRL112_DERIVED, "exp_name"] if n not in names]
    args = PPOConfig(output_dir=str(tmp_path))
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    for name, value in TRL112_DEFAULTS.items():
        # num_mini_batches: None until derived (it may come from rollout_batch_size), then 1 as in TRL 1.12.
        expected = value if name != "gradient_checkpointing" else None
        assert defaults[name] == expected or (name == "num_mini_batches" and defaults[name] is None), name
        assert getattr(args, name) == value, name
    assert args.activation_checkpointing is True
    assert args.world_size == 1 and isinstance(args.world_size, int)


@pytest.mark.parametrize(
    "per_device, accumulation, mini_batches, expected",
    [
        # (batch_size, mini_batch_size, local_batch_size, local_mini_batch_size, micro_batch_size)
        (4, 1, 1, (4, 4, 4, 4, 4)),
        (4, 8, 2, (32, 16, 32, 16, 4)),
        # per_device_train_batch_size shrinks to the mini batch of 4, and so does the micro batch (TRL 1.12 sliced
        # its micro-batches out of that mini batch too)
        (8, 1, 2, (8, 4, 8, 4, 4)),
    ],
)
def test_batch_sizes_mean_what_they_meant_in_trl112(tmp_path, per_device, accumulation, mini_batches, expected):
    args = PPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_mini_batches=mini_batches,
    )
    got = (args.batch_size, args.mini_batch_size, args.local_batch_size, args.local_mini_batch_size)
    assert got + (args.micro_batch_size,) == expected
    # TRL 1.12's rollout batch is per_device x accumulation x processes, not num_mini_batches times more.
    assert args.rollout_batch_size == per_device * accumulation
    # One optimizer step per mini batch: the Trainer accumulates that mini batch's micro-batches.
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == args.local_mini_batch_size
    assert args.steps_per_rollout == args.num_ppo_epochs * mini_batches


def test_rollout_batch_size_still_gives_the_papers_buffer(tmp_path):
    args = PPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=16,
        rollout_batch_size=1024,
    )
    assert (args.batch_size, args.mini_batch_size, args.num_mini_batches) == (1024, 128, 8)


def test_total_episodes_sets_max_steps_and_refuses_a_different_max_steps(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_ppo_epochs=2, total_episodes=10)
    assert (args.num_total_batches, args.max_steps) == (math.ceil(10 / 4), 3 * 2)
    with pytest.raises(ValueError, match="set only one"):
        PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, total_episodes=10, max_steps=5)


def test_config_rebuilt_from_its_dict_is_the_same(tmp_path):
    args = PPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=8, num_mini_batches=2
    )
    fields = {f.name for f in dataclasses.fields(PPOConfig) if f.init}
    # to_dict() redacts fields ending in `_token` (stop_token); everything else rebuilds the same config.
    kwargs = {k: v for k, v in vars(args).items() if k in fields and k != "stop_token"}
    again = PPOConfig(**kwargs)
    for name in (*TRL112_DERIVED, "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches"):
        assert getattr(again, name) == getattr(args, name), name


# ---------------------------------------------------------------------------------------------- trainer API


def _small_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_ppo_epochs=1,
        response_length=6,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def _tokenized(tokenizer, n=8):
    ids = [tokenizer(f"What is {i} plus {i}?")["input_ids"] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids})


def test_positional_arguments_follow_trl112_order_and_data_collator_is_used(hub, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(hub / "sft", padding_side="left")
    calls = []
    collator = DataCollatorWithPadding(tokenizer)

    def data_collator(features):
        calls.append(len(features))
        return collator(features)

    policy, ref = AutoModelForCausalLM.from_pretrained(hub / "sft"), AutoModelForCausalLM.from_pretrained(hub / "sft")
    reward = AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1)
    data = _tokenized(tokenizer)
    # args, processing_class, model, ref_model, reward_model, train_dataset, value_model, data_collator, eval_dataset
    trainer = PPOTrainer(
        _small_args(tmp_path), tokenizer, policy, ref, reward, data, value, data_collator, _tokenized(tokenizer, 4)
    )
    assert trainer.model.value_model is value and trainer.train_dataset.num_rows == 8
    trainer.train()
    assert calls, "the data_collator was never called"


def test_input_ids_are_used_as_given_even_next_to_a_prompt_column(hub, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(hub / "sft", padding_side="left")
    ids = [[tokenizer.eos_token_id, 7, 8, 9 + i] for i in range(8)]  # not what tokenizing `prompt` gives
    data = Dataset.from_dict({"prompt": [f"What is {i}?" for i in range(8)], "input_ids": ids})
    trainer = PPOTrainer(
        args=_small_args(tmp_path),
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(hub / "sft"),
        ref_model=AutoModelForCausalLM.from_pretrained(hub / "sft"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1),
        train_dataset=data,
    )
    assert trainer.train_dataset["input_ids"] == ids


def test_a_dataset_without_input_ids_or_prompt_is_refused_naming_both(hub, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(hub / "sft", padding_side="left")
    with pytest.raises(ValueError, match=r"`input_ids`.*`prompt`"):
        PPOTrainer(
            args=_small_args(tmp_path),
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(hub / "sft"),
            ref_model=AutoModelForCausalLM.from_pretrained(hub / "sft"),
            reward_model=AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1),
            train_dataset=Dataset.from_dict({"text": ["a", "b", "c", "d"]}),
        )


def _trainer(hub, tmp_path, value_model=None, peft_config=None, ref_model=True, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(hub / "sft", padding_side="left")
    return PPOTrainer(
        args=_small_args(tmp_path, **overrides),
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(hub / "sft"),
        ref_model=AutoModelForCausalLM.from_pretrained(hub / "sft") if ref_model else None,
        reward_model=AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1),
        train_dataset=_tokenized(tokenizer),
        value_model=value_model,
        eval_dataset=_tokenized(tokenizer, 4),
        peft_config=peft_config,
    )


def test_sequence_classifier_critic_reads_per_token_values_through_its_backbone(hub, tmp_path):
    value = AutoModelForSequenceClassification.from_pretrained(hub / "rm", num_labels=1)
    trainer = _trainer(hub, tmp_path, value_model=value, save_strategy="steps", save_steps=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    _, values = trainer.model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        hidden = value.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(values.detach(), value.score(hidden).squeeze(-1))
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2" / "value_model"
    assert (checkpoint / "model.safetensors").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    for (name, p), (_, q) in zip(trainer.model.value_model.named_parameters(), reloaded.named_parameters()):
        torch.testing.assert_close(p.detach(), q, msg=name)
    # Resuming loads it back into the trainer's critic.
    resumed = _trainer(hub, tmp_path / "resumed", value_model=AutoModelForSequenceClassification.from_pretrained(
        hub / "rm", num_labels=1))  # fmt: skip
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(resumed.model.value_model.score.weight, reloaded.score.weight)


def test_generate_completions_returns_and_prints_a_table(hub, tmp_path, capsys):
    trainer = _trainer(hub, tmp_path)
    table = trainer.generate_completions()
    assert list(table.columns) == ["query", "model response", "score"] and len(table) == 4
    assert len(trainer.generate_completions(sampling=True)) == 4  # one eval batch of per_device_eval_batch_size
    assert "query" in capsys.readouterr().out
    assert trainer.model.training  # generation left the model as it found it


def test_generate_completions_prints_plain_text_without_rich(hub, tmp_path, capsys, monkeypatch):
    trainer = _trainer(hub, tmp_path)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    trainer.generate_completions(sampling=True)
    out = capsys.readouterr().out
    assert "model response" in out and "┃" not in out


def test_num_sample_generations_calls_generate_completions_during_training(hub, tmp_path):
    # 4 updates, num_sample_generations=2: every 2 updates, after updates 1 and 3 (as TRL 1.12).
    trainer = _trainer(hub, tmp_path, max_steps=4, num_sample_generations=2, per_device_train_batch_size=2)
    calls = []
    trainer.generate_completions = lambda sampling=False: calls.append((trainer.state.global_step, sampling))
    trainer.train()
    assert calls == [(1, True), (3, True)]


def test_null_ref_context_disables_the_adapter_of_a_peft_policy(hub, tmp_path):
    from peft import LoraConfig

    trainer = _trainer(hub, tmp_path, ref_model=False, peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    policy = trainer.model.policy
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        with_adapter = policy(input_ids=ids).logits
        with trainer.null_ref_context():
            without = policy(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(hub / "sft")(input_ids=ids).logits
    torch.testing.assert_close(without, base)
    assert not torch.allclose(with_adapter, base)


def test_null_ref_context_activates_the_ref_adapter_and_restores_the_active_one(hub, tmp_path):
    from peft import LoraConfig

    trainer = _trainer(hub, tmp_path, ref_model=False, peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    policy = trainer.model.policy
    policy.add_adapter("ref", LoraConfig(r=4, task_type="CAUSAL_LM"))
    policy.add_adapter("other", LoraConfig(r=4, task_type="CAUSAL_LM"))
    policy.set_adapter("other")  # not `model_adapter_name` (unset, i.e. "default"): the one active must come back
    trainer.args.ref_adapter_name = "ref"
    with trainer.null_ref_context():
        assert policy.active_adapter == "ref"
    assert policy.active_adapter == "other"


def test_no_ref_model_means_a_frozen_copy_of_the_policy_as_in_trl112(hub, tmp_path):
    trainer = _trainer(hub, tmp_path, ref_model=False)
    policy = trainer.model.policy
    assert trainer.ref_model is not policy and not any(p.requires_grad for p in trainer.ref_model.parameters())
    for (name, p), (_, q) in zip(policy.named_parameters(), trainer.ref_model.named_parameters()):
        torch.testing.assert_close(p.detach(), q, msg=name)
    trainer.train()
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), trainer.ref_model.parameters()))
