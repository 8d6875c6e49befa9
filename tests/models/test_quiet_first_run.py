"""What a new user's first run prints: no transformers "LOAD REPORT" table for the critic's value head, which the
trainer initialises on purpose (one log line says so instead), and no `pin_memory` warning on a CPU-only machine."""

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.models.modeling import build_value_model
from srppo_trl.pipeline import PipelineArguments, build_group_config, sft_config
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer
from srppo_trl.trainer.precision import training_on_cpu


CPU_ONLY = training_on_cpu(False)
PIN_WARNING = "'pin_memory' argument is set as true but no accelerator is found"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_messages():
    """Every message transformers' `modeling_utils` logs (it does not propagate to the root logger, so no caplog)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the default; the report is a warning
    handler = _Records()
    hf_logging.get_logger("transformers.modeling_utils").addHandler(handler)
    yield handler.messages
    hf_logging.get_logger("transformers.modeling_utils").removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def test_a_critic_built_from_the_sft_folder_logs_one_line_and_no_load_report(
    tokenizer, tmp_path, transformers_messages, caplog
):
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "sft")
    with caplog.at_level(logging.INFO, logger="srppo_trl.models.modeling"):
        critic = build_value_model(str(tmp_path / "sft"))
    assert not [m for m in transformers_messages if "LOAD REPORT" in m], transformers_messages
    lines = [r.getMessage() for r in caplog.records if r.name == "srppo_trl.models.modeling"]
    assert lines == [
        f"Critic: the backbone of {tmp_path / 'sft'} and a new value head (score.bias, score.weight), initialised by "
        "the trainer."
    ]
    assert critic.score.weight.std() < 0.5  # initialised by the trainer (OpenRLHF's N(0, 1 / (hidden + 1)))


def test_a_saved_critic_keeps_its_head_and_says_so(tokenizer, tmp_path, transformers_messages, caplog):
    saved = build_value_model(tiny_causal_lm(tokenizer))
    saved.save_pretrained(tmp_path / "critic")
    with caplog.at_level(logging.INFO, logger="srppo_trl.models.modeling"):
        critic = build_value_model(str(tmp_path / "critic"))
    torch.testing.assert_close(critic.score.weight, saved.score.weight)
    assert [r.getMessage() for r in caplog.records if r.name == "srppo_trl.models.modeling"] == [
        f"Critic: {tmp_path / 'critic'}, with its trained value head."
    ]


def test_other_transformers_messages_still_show(tokenizer, tmp_path, transformers_messages):
    # Only the report is dropped, and only while the critic loads: a plain load still reports the missing head.
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "sft")
    AutoModelForTokenClassification.from_pretrained(tmp_path / "sft", num_labels=1)
    assert [m for m in transformers_messages if "LOAD REPORT" in m]


@pytest.mark.skipif(not CPU_ONLY, reason="the pin_memory warning is about machines without an accelerator")
def test_pin_memory_is_off_on_a_cpu_only_run(tmp_path):
    assert SRPPOConfig(output_dir=str(tmp_path)).dataloader_pin_memory is False
    # TrainingArguments' CLI flags keep working (`--no_dataloader_pin_memory` exists for a bool defaulting to True).
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(SRPPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--no_dataloader_pin_memory"]
    )
    assert parsed.dataloader_pin_memory is False


@pytest.mark.skipif(not CPU_ONLY, reason="the pin_memory warning is about machines without an accelerator")
def test_the_pipelines_sft_and_group_configs_follow_the_srppo_config(tmp_path):
    srppo_args = SRPPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    assert sft_config(PipelineArguments(), srppo_args, tmp_path / "sft").dataloader_pin_memory is False
    pinned = PipelineArguments(sft_extra={"dataloader_pin_memory": True})  # the user's explicit setting wins
    assert sft_config(pinned, srppo_args, tmp_path / "sft").dataloader_pin_memory is True
    assert build_group_config(PipelineArguments(algorithm="grpo"), srppo_args).dataloader_pin_memory is False


@pytest.mark.skipif(not CPU_ONLY, reason="the pin_memory warning is about machines without an accelerator")
def test_a_tiny_cpu_run_does_not_warn_about_pin_memory(tokenizer, tmp_path):
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, max_steps=1),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward,
        train_dataset=tiny_prompts(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if PIN_WARNING in str(w.message)]
