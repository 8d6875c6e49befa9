"""Sharded engines on CPU: SFT -> SRPPO under `accelerate launch` with the repo's own accelerate configs.

What runs on a CPU-only machine (accelerate 1.15, torch 2.13, DeepSpeed 0.19; details in docs/troubleshooting.md):
- DeepSpeed ZeRO-3 (its CPU accelerator, gloo): runs. `test_deepspeed_zero3_matches_ddp` launches two processes with
  recipes/accelerate_configs/deepspeed_zero3.yaml and checks the saved weights against the same run under DDP.
  It needs the `deepspeed` package (`pip install -e '.[deepspeed]'`, ~4 min with its first launch compiling a small
  C++ op); without it the test skips.
- FSDP: does not run. Accelerate sets FSDP up only for GPU-like devices: with `use_cpu: true` it silently trains with
  plain DDP (MULTI_CPU) and ignores `fsdp_config`, with `use_cpu: false` it finds no backend and every process trains
  alone. `test_fsdp_config_parses_and_builds_the_trainer` keeps the config honest.

The launched runs use tests/scripts/sft_srppo_tiny.py: tiny models, 2 SFT steps, 4 SRPPO steps (a critic warm-up
buffer, then a PPO buffer), a checkpoint every buffer, a second run resumed from the first checkpoint, `save_model`.
"""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "scripts" / "sft_srppo_tiny.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"
# Float32 rounding, carried through 2 SFT and 4 SRPPO steps (gradients reduced in another order): ~1e-6 measured.
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_config(name: str, tmp_path: Path, **deepspeed_config) -> Path:
    """The repo's accelerate config for 8 GPUs in bf16, shrunk to this machine: 2 processes, fp32 (the weights are
    compared with the DDP run's to float32 tolerance; bf16 would compare bf16 rounding). Every other key is kept,
    except the `deepspeed_config` keys given."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    config.update(num_processes=2, mixed_precision="no")
    config.get("deepspeed_config", {}).update(deepspeed_config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(out: Path, *launch_args: str, script_args: tuple[str, ...] = ()) -> str:
    """`accelerate launch` the script with two processes; returns its stdout, or fails with the end of its output."""
    subprocess.run([sys.executable, str(SCRIPT), str(out), "--prepare"], check=True, timeout=120)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", *launch_args, "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(_free_port()), str(SCRIPT), str(out), *script_args,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(command)}` did not finish in {exc.timeout} s:\n{(exc.stderr or '')[-3000:]}")
    assert result.returncode == 0, f"`{' '.join(command)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved model, loaded in this one process with `from_pretrained` (the critic: its file)."""
    if (folder / "config.json").exists() and "value_model" not in folder.name:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        return {k: v.detach() for k, v in model.state_dict().items()}
    return load_file(folder / "model.safetensors")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The same SFT -> SRPPO run without sharding: two processes, DDP over gloo (`--multi_gpu` picks torchrun)."""
    out = tmp_path_factory.mktemp("ddp")
    stdout = _launch(out, "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no")
    assert "engine=DistributedType.MULTI_CPU world_size=2" in stdout
    assert "critic_copy_max_difference=0.0" in stdout, stdout[-2000:]
    return out


# Saved folders compared between the engines: the SFT model, the policy and critic after the warm-up buffer (the
# actor's lr is 0 there) and after the PPO buffer, the final `save_model` and the resumed run's final model.
SAVED = [
    "sft",
    "run/checkpoint-2",
    "run/checkpoint-2/value_model",
    "run/checkpoint-4/value_model",
    "run/final",
    "resumed/final",
]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: `pip install -e '.[deepspeed]'` (CPU accelerator, ~4 min) to run ZeRO-3",
)
def test_deepspeed_zero3_matches_ddp(tmp_path, ddp_run):
    out = tmp_path / "zero3"
    stdout = _launch(out, "--config_file", str(_local_config("deepspeed_zero3.yaml", tmp_path)))
    assert "engine=DistributedType.DEEPSPEED world_size=2" in stdout, stdout[-2000:]
    # The actor/critic parameter groups (and their learning rates) survive DeepSpeed's optimizer wrapping.
    assert "('actor', 0.05" in stdout and "('critic', 0.15" in stdout, stdout[-2000:]
    # A critic built (value_model=None) from an in-memory policy whose weights ZeRO-3 partitioned as they loaded holds
    # the full SFT weights, not the empty partitions.
    assert "critic_copy_max_difference=0.0" in stdout, stdout[-2000:]
    # The checkpoint is DeepSpeed's own (sharded optimizer and weights per rank); resuming read it.
    assert sorted(p.name for p in (out / "run" / "checkpoint-2" / "global_step2").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
    ]
    for name in SAVED:
        difference = _max_difference(_weights(out / name), _weights(ddp_run / name))
        assert difference < TOLERANCE, f"{name}: ZeRO-3 and DDP weights differ by {difference}"
    # The resumed run ends where the uninterrupted one does, and training moved the weights well beyond the tolerance
    # (else the comparisons above would prove nothing).
    assert _max_difference(_weights(out / "resumed/final"), _weights(out / "run/final")) < TOLERANCE
    assert _max_difference(_weights(out / "run/final"), _weights(out / "sft")) > 1000 * TOLERANCE
    critic_moved = _max_difference(
        _weights(out / "run/checkpoint-4/value_model"), _weights(out / "run/checkpoint-2/value_model")
    )
    assert critic_moved > 100 * TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: `pip install -e '.[deepspeed]'` (CPU accelerator, ~4 min) to run ZeRO-3",
)
@pytest.mark.parametrize(
    "config, deepspeed_config, inner",
    [
        ("deepspeed_zero2.yaml", {}, "AdamW"),
        ("deepspeed_zero3.yaml", {}, "AdamW"),
        # accelerate swaps AdamW for DeepSpeed's CPU Adam (its C++ op keeps its own step count) with the offload
        ("deepspeed_zero3.yaml", {"offload_optimizer_device": "cpu"}, "DeepSpeedCPUAdam"),
    ],
    ids=["zero2", "zero3", "zero3_cpu_adam"],
)
def test_deepspeed_first_actor_step_after_the_warmup_is_a_fresh_adam_step(tmp_path, config, deepspeed_config, inner):
    # During the critic warm-up DeepSpeed's flat actor partitions hold zero gradients and Adam steps their state (2
    # warm-up steps here); the trainer drops that state at the first actor step, so after it every actor partition's
    # Adam step count is 1, on both processes (3 without the reset).
    out = tmp_path / "adam"
    stdout = _launch(
        out,
        "--config_file",
        str(_local_config(config, tmp_path, **deepspeed_config)),
        script_args=("--adam_after_warmup",),
    )
    # The two processes' prints may share a line of the captured output: read every report wherever it is.
    reports = re.findall(r"engine=(\w+) rank=(\d) optimizer=(\w+) actor_adam_steps=\[([^\]]*)\]", stdout)
    assert sorted(rank for _, rank, _, _ in reports) == ["0", "1"], stdout[-2000:]
    assert all(engine == "true" and optimizer == inner for engine, _, optimizer, _ in reports), reports
    assert all(steps == "1" for *_, steps in reports), reports


def test_fsdp_config_parses_and_builds_the_trainer(tmp_path, monkeypatch):
    """FSDP cannot run on CPU (see the module docstring): the config still parses into accelerate's FSDP plugin and an
    SRPPOTrainer builds with it (in one process accelerate then leaves the model unwrapped)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    from srppo_trl import CoherentRewardModel, SRPPOTrainer
    from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer

    # What `accelerate launch --config_file fsdp.yaml` hands the processes: FSDP_* environment variables.
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.auto_wrap_policy is not None and plugin.cpu_ram_efficient_loading

    tokenizer = tiny_tokenizer()
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, critic_learning_rate=3e-3),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
    )
    optimizer = trainer.create_optimizer()
    assert [g["srppo_role"] for g in optimizer.param_groups] == ["actor", "actor", "critic", "critic"]
