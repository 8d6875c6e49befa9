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
