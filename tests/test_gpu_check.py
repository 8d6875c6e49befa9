"""scripts/gpu_check.py runs on CPU at a tiny shape (its GPU figures need a CUDA machine; see the script)."""

import importlib.util
from pathlib import Path

import pytest
import torch


def _load():
    path = Path(__file__).parent.parent / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    gpu_check = _load()
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "tiny", "--qlora-shape", "tiny", "--prompts", "4",
            "--tokens", "6", "--buffers", "2", "--micro-batch", "2", "--lora-rank", "4", "--out", str(out)]  # fmt: skip
    results = {r["mode"]: r for r in gpu_check.main(argv)}
    for mode in ("four_model", "single_base_lora"):
        assert "error" not in results[mode], results[mode]
        assert results[mode]["buffers"] == 2 and results[mode]["s_per_buffer"] > 0
        assert results[mode]["loss_finite"]
    # Single-base trains adapters only: far fewer parameters than the full policy + critic.
    assert results["single_base_lora"]["trainable_params"] < results["four_model"]["trainable_params"] / 4
    if not torch.cuda.is_available():
        assert "skipped" in results["single_base_qlora"]
    assert out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, bitsandbytes)")
def test_gpu_check_on_cuda(tmp_path):
    gpu_check = _load()
    argv = ["--shape", "135m", "--qlora-shape", "135m", "--prompts", "8", "--tokens", "16", "--buffers", "2"]
    for result in gpu_check.main(argv):
        assert "error" not in result, result


def test_pipeline_verb_runs_the_notebooks_gpu_configuration_on_cpu(tmp_path):
    # Tiny Mistral-shaped random base, LoRA on fp32 instead of 4-bit (bitsandbytes needs CUDA), 1 SFT step, 2 rollout
    # buffers of 16 prompts (the notebook's mini-batch is 16), 8-token responses, 48-token prompts.
    gpu_check = _load()
    out = tmp_path / "pipeline.json"
    argv = ["pipeline", "--device", "cpu", "--shape", "tiny", "--sft-steps", "1", "--prompts", "16", "--buffers", "2",
            "--tokens", "8", "--prompt-tokens", "48", "--sft-tokens", "64", "--out", str(out)]  # fmt: skip
    [result] = gpu_check.main(argv)
    assert "error" not in result, result["error"]
    assert set(result["phases"]) == set(gpu_check.PHASES)
    for phase in ("sft", "load_models", "generation", "scoring", "ppo_update"):
        assert result["phases"][phase]["seconds"] > 0, phase
    assert result["configuration"]["pipe"]["single_base"] and result["configuration"]["pipe"]["sft_max_steps"] == 1
    assert {"adapter_model.safetensors", "sft", "critic"} <= set(result["srppo_files"])  # adapters only
    assert set(result["results"]) == {"SFT", "SRPPO"}
    assert out.exists()


def test_notebook_gpu_configuration_is_single_base_qlora_sized_for_a_t4():
    from trl import ModelConfig

    from srppo_trl.pipeline.run import PipelineArguments

    config = _load().notebook_gpu_config(bf16=False, base_model="mistralai/Mistral-7B-v0.1")
    pipe, model = PipelineArguments(**config["pipe"]), ModelConfig(**config["model"])
    assert pipe.single_base and pipe.base_model == "mistralai/Mistral-7B-v0.1"
    assert model.load_in_4bit and model.use_peft and model.dtype == "float16"  # no bf16 on a T4
    args = config["args"]
    assert args["fp16"] and not args["bf16"] and args["activation_checkpointing"]
    # The numbers the notebook's memory arithmetic assumes: micro-batch 1, responses of 256 tokens after prompts of
    # at most 1024, LoRA rank 16 on the seven projections.
    assert args["per_device_train_batch_size"] == 1 and args["response_length"] == 256
    assert args["max_prompt_length"] == 1024 and model.lora_r == 16 and len(model.lora_target_modules) == 7
