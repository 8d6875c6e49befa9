"""SPIN on TRL's DPOTrainer: pairs, the opponent as reference, the margin, resume, refusals, the pipeline.

Shrunk for tiny models on CPU: 8 demonstrations (SPIN: 50k), 8-token opponent responses (SPIN: 256), 2-4 DPO steps
per iteration (SPIN: 2 epochs), learning rate 1e-3 (SPIN: 5e-7) so that a few steps visibly move a tiny model.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import processors
from transformers import AutoModelForCausalLM, TrainerCallback

from srppo_trl.data.tokenization import ensure_chat_template_bos, tokenize_prompt
from srppo_trl.pipeline import spin
from srppo_trl.pipeline.run import PipelineArguments, main, parse_args
from srppo_trl.pipeline.spin import (
    SPINGenerationConfig,
    build_dpo_trainer,
    build_spin_pairs,
    check_spin_inputs,
    demonstration_examples,
    generate_responses,
    run_spin,
)
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


RECIPES = Path(__file__).parents[2] / "recipes"
FIXTURES = Path(__file__).parents[1] / "fixtures"
GENERATION = SPINGenerationConfig(max_new_tokens=8, batch_size=4, seed=0)


def demonstrations(n: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
                for i in range(n)
            ]
        }
    )


def dpo_values(**overrides) -> dict:
    values = dict(
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.1,
        max_length=128,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sft_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """Adds a BOS to plain text like Llama/Mistral's, with TULU's template (no BOS of its own) as the pipeline sets."""
    from importlib import resources

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = resources.files("srppo_trl").joinpath("chat_templates", "tulu.jinja").read_text()
    ensure_chat_template_bos(tok)
    return tok


def _weights(path) -> dict:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- pairs


def test_pairs_hold_the_demonstration_as_chosen_and_the_generation_as_rejected_templated_once(bos_tokenizer, tmp_path):
    tok = copy.deepcopy(bos_tokenizer)
    model = tiny_causal_lm(tok, seed=0)
    model.save_pretrained(tmp_path / "opponent")
    examples = demonstration_examples(demonstrations(4))
    responses = generate_responses(model, tok, list(examples["prompt"]), GENERATION, seed=0)
    pairs, dropped = build_spin_pairs(examples, responses)
    assert dropped == 0 and len(pairs) == 4
    for pair, example, response in zip(pairs, examples, responses):
        assert pair["prompt"] == example["prompt"]  # chat messages, not a rendered string
        assert pair["chosen"] == [{"role": "assistant", "content": example["demonstration"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": response}]

    trainer = build_dpo_trainer(str(tmp_path / "opponent"), {}, dpo_values(), tmp_path / "dpo", tok, pairs, None, None)
    for row, pair in zip(trainer.train_dataset, pairs):
        # DPOTrainer trains on the very prompt ids the opponent generated from: one BOS, one template.
        assert row["prompt_ids"] == tokenize_prompt(tok, pair["prompt"])
        full = tok.decode(row["prompt_ids"] + row["chosen_ids"])
        assert full.count("<s>") == 1 and full.count("<|user|>") == 1 and full.count("<|assistant|>") == 1
        assert tok.decode(row["chosen_ids"]) == pair["chosen"][0]["content"] + tok.eos_token
        assert tok.decode(row["rejected_ids"], skip_special_tokens=True).strip() == pair["rejected"][0]["content"]


def test_a_response_equal_to_its_demonstration_is_dropped_and_counted():
    examples = demonstration_examples(demonstrations(3))
    pairs, dropped = build_spin_pairs(examples, ["0.", " 2. \n", "something else"])  # equal up to whitespace
    assert dropped == 2
    assert [p["rejected"][0]["content"] for p in pairs] == ["something else"]


def test_multi_turn_demonstrations_keep_their_earlier_turns_in_the_prompt():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    (example,) = demonstration_examples(Dataset.from_dict({"messages": [messages]}))
    assert example["prompt"] == messages[:-1] and example["demonstration"] == "4."


def test_generation_sets_every_sampling_field_and_ignores_the_checkpoints_defaults(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=0)
    prompts = list(demonstration_examples(demonstrations(4))["prompt"])
    reference = generate_responses(model, tokenizer, prompts, GENERATION, seed=3)
    # A checkpoint asking for greedy, 1-token answers changes nothing: every field is set explicitly.
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 1
    model.generation_config.top_k = 1
    assert generate_responses(model, tokenizer, prompts, GENERATION, seed=3) == reference


# ---------------------------------------------------------------------------------------------- iterations


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_the_reference_of_iteration_t_is_iteration_t_minus_1s_policy(
    use_peft, tokenizer, sft_folder, tmp_path, monkeypatch
):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_peft else None
    ids = torch.tensor([tokenize_prompt(tokenizer, [{"role": "user", "content": "What is 3 plus 3?"}])])
    seen = []

    def recording(opponent, *args, **kwargs):
        trainer = build_dpo_trainer(opponent, *args, **kwargs)
        model = trainer.accelerator.unwrap_model(trainer.model)
        if use_peft:
            assert trainer.ref_model is None  # DPOTrainer's reference: the policy with its adapter off
            with model.disable_adapter():
                reference = _logits(model, ids)
        else:
            reference = _logits(trainer.ref_model, ids)
        seen.append((opponent, reference, _logits(model, ids)))
        return trainer

    monkeypatch.setattr(spin, "build_dpo_trainer", recording)
    records = run_spin(
        sft_folder, demonstrations(), tokenizer, tmp_path, iterations=2, dpo_values=dpo_values(),
        generation=GENERATION, peft_config=peft_config,
    )  # fmt: skip
    assert [r.opponent for r in records] == [sft_folder, str(tmp_path / "iter-1" / "model")]
    assert [s[0] for s in seen] == [r.opponent for r in records]
    for opponent, reference, policy in seen:
        expected = _logits(AutoModelForCausalLM.from_pretrained(opponent), ids)
        torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(policy, expected, rtol=1e-5, atol=1e-5)  # each iteration starts at the opponent
    # Iteration 1 trained: iteration 2's reference is not the SFT model any more.
    assert not torch.allclose(seen[1][1], seen[0][1])
    summary = json.loads((tmp_path / "spin.json").read_text())
    assert [s["model"] for s in summary] == [r.model for r in records]
    assert all(s["pairs"] + s["dropped_equal"] == 8 for s in summary)


def test_dpo_margin_grows_on_the_training_pairs(tokenizer, sft_folder, tmp_path):
    examples = demonstration_examples(demonstrations())
    model = AutoModelForCausalLM.from_pretrained(sft_folder)
    pairs, _ = build_spin_pairs(
        examples, generate_responses(model, tokenizer, list(examples["prompt"]), GENERATION, 0)
    )
    trainer = build_dpo_trainer(sft_folder, {}, dpo_values(max_steps=6), tmp_path, tokenizer, pairs, None, None)
    before = trainer.evaluate(pairs)["eval_rewards/margins"]
    trainer.train()
    after = trainer.evaluate(pairs)["eval_rewards/margins"]
    assert before == pytest.approx(0.0, abs=1e-5)  # policy == reference (the opponent) before training
    assert after > before + 0.1


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((Path(args.output_dir).name, state.global_step))


class CrashAt(TrainerCallback):
    """Raises after optimizer step `step` of iteration `iteration` (after its step-2 checkpoint was written)."""

    def __init__(self, iteration: int, step: int):
        self.iteration, self.step = iteration, step

    def on_step_end(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == f"iter-{self.iteration}" and state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_mid_iteration_gives_the_weights_of_an_uninterrupted_run(tokenizer, sft_folder, tmp_path, monkeypatch):
    values = dpo_values(max_steps=4, save_strategy="steps", save_steps=2)
    kwargs = dict(iterations=2, dpo_values=values, generation=GENERATION)
    uninterrupted = run_spin(sft_folder, demonstrations(), tokenizer, tmp_path / "a", **kwargs)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_spin(sft_folder, demonstrations(), tokenizer, tmp_path / "b", callbacks=[CrashAt(2, 3)], **kwargs)
    assert (tmp_path / "b" / "iter-1" / "model" / "model.safetensors").exists()
    assert (tmp_path / "b" / "iter-2" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "iter-2" / "model").exists()

    # A later checkpoint cut short by a kill mid-save (its trainer_state.json empty) is skipped, not resumed from.
    import shutil

    broken = tmp_path / "b" / "iter-2" / "checkpoint-3"
    shutil.copytree(tmp_path / "b" / "iter-2" / "checkpoint-2", broken)
    (broken / "trainer_state.json").write_text("")

    # The rerun reuses iteration 1 and iteration 2's pairs (no generation) and resumes from checkpoint-2.
    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed iteration must reuse its pairs")

    built = []

    def counting(*args, **kwargs):
        built.append(args[0])
        return build_dpo_trainer(*args, **kwargs)

    monkeypatch.setattr(spin, "generate_sharded", no_generation)
    monkeypatch.setattr(spin, "build_dpo_trainer", counting)
    recorder = StepRecorder()
    resumed = run_spin(sft_folder, demonstrations(), tokenizer, tmp_path / "b", callbacks=[recorder], **kwargs)
    assert built == [str(tmp_path / "b" / "iter-1" / "model")]  # only iteration 2 trains again
    assert recorder.steps == [("iter-2", 3), ("iter-2", 4)]  # from its step-2 checkpoint, not from its start
    assert (tmp_path / "b" / "iter-2" / "pairs.jsonl").read_text() == (
        tmp_path / "a" / "iter-2" / "pairs.jsonl"
    ).read_text()
    expected, got = _weights(uninterrupted[-1].model), _weights(resumed[-1].model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    sft = _weights(sft_folder)
    assert any(not torch.equal(sft[name], got[name]) for name in sft)
    # spin.json of the resumed run keeps iteration 1's record (trained in the crashed run) whole.
    summary = json.loads((tmp_path / "b" / "spin.json").read_text())
    assert summary[0]["metrics"]["train_loss"] == uninterrupted[0].metrics["train_loss"]


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_input_is_refused_before_any_training(tokenizer, sft_folder, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("nothing may be loaded or trained")

    monkeypatch.setattr("srppo_trl.pipeline.run.load_causal_lm", no_load)
    empty = Dataset.from_dict({"messages": []})
    with pytest.raises(ValueError, match="SPIN needs demonstrations"):
        run_spin(sft_folder, empty, tokenizer, tmp_path, iterations=1, dpo_values=dpo_values())
    with pytest.raises(ValueError, match="spin_iterations >= 1"):
        run_spin(sft_folder, demonstrations(), tokenizer, tmp_path, iterations=0, dpo_values=dpo_values())
    no_answer = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(ValueError, match="not ending with an assistant turn"):
        check_spin_inputs(no_answer, 1)
    with pytest.raises(ValueError, match="spin_iterations must be >= 1, got 0"):
        PipelineArguments(algorithm="spin", spin_iterations=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        SPINGenerationConfig(temperature=0)
    assert not any(tmp_path.iterdir())


def test_pipeline_refuses_bad_spin_settings_before_sft(tiny_base, tmp_path):
    argv = ["--model_name_or_path", str(tiny_base), "--output_dir", str(tmp_path), "--bf16", "false"]
    config = str(RECIPES / "configs" / "smollm2_demo_spin.yaml")
    with pytest.raises(ValueError, match="DPOConfig does not have"):
        main([*argv, "--spin_trainer_extra", '{"betta": 0.1}'], default_config=config)
    with pytest.raises(ValueError, match="set use_vllm: false"):
        main([*argv, "--use_vllm", "true"], default_config=config)
    assert not (tmp_path / "sft").exists()


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["mistral_min_overlap_spin", "smollm2_demo_spin"])
def test_spin_recipes_parse(name):
    pipe, srppo_args, _ = parse_args(["--bf16", "false"], default_config=str(RECIPES / "configs" / f"{name}.yaml"))
    assert pipe.algorithm == "spin" and pipe.spin_iterations >= 1
    assert pipe.spin_trainer_extra["beta"] == 0.1 and pipe.spin_trainer_extra["loss_type"] == "sigmoid"


def test_spin_pipeline_runs_end_to_end_on_tiny_models(tiny_base, tmp_path):
    argv = [
        "--model_name_or_path", str(tiny_base), "--output_dir", str(tmp_path),
        "--tulu_source", str(FIXTURES / "tulu_v2_sample.jsonl"), "--tulu_num_samples", "6",
        "--ultrafeedback_source", str(tmp_path / "absent.jsonl"),  # SPIN needs no prompt set: never read
        "--sft_max_steps", "1", "--sft_per_device_train_batch_size", "2", "--sft_gradient_accumulation_steps", "1",
        "--sft_max_length", "128", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--max_steps", "1", "--spin_iterations", "2", "--spin_generation_max_new_tokens", "8",
        "--spin_trainer_extra", '{"beta": 0.1, "loss_type": "sigmoid", "max_length": 128}',
        "--bf16", "false", "--dtype", "float32", "--activation_checkpointing", "false", "--report_to", "none",
        "--save_strategy", "no",
    ]  # fmt: skip
    result = main(argv, default_config=str(RECIPES / "configs" / "mistral_min_overlap_spin.yaml"))
    assert result["spin_model"] == str(tmp_path / "spin" / "iter-2" / "model")
    assert (Path(result["spin_model"]) / "model.safetensors").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [it["iteration"] for it in saved["spin_iterations"]] == [1, 2]
    assert saved["spin_iterations"][0]["pairs"] + saved["spin_iterations"][0]["dropped_equal"] == 6
