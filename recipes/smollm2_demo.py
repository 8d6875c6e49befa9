"""The small default: SFT -> SRPPO on SmolLM2-135M-Instruct with the shipped demo data, offline, on CPU.

Usage (single device, ~36 minutes on 2 idle AVX2 CPU cores in fp32; on a CPU with AVX-512 BF16/AMX it runs in bf16
autocast, ~13 minutes on one core of an AMX VM; this is what `make demo` runs):

    python recipes/smollm2_demo.py --config recipes/configs/smollm2_demo.yaml

Any field can be overridden on the command line, e.g. `--num_prompts 32 --offline_eval_n 0` for a 5-minute run.
With a GPU and accelerate:

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/smollm2_demo.py \
        --config recipes/configs/smollm2_demo.yaml
"""

import sys
from pathlib import Path

import yaml

from srppo_trl.pipeline import main
from srppo_trl.trainer.precision import cpu_has_fast_bf16, training_on_cpu


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2_demo.yaml"
PRECISION_FLAGS = ("bf16", "fp16")


def _config_file(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return DEFAULT_CONFIG


def _precision_chosen(argv: list[str]) -> bool:
    """True when the command line or the config file sets bf16 or fp16 (the user's choice then stands)."""
    if any(arg in (f"--{f}" for f in PRECISION_FLAGS) or arg.startswith(("--bf16=", "--fp16=")) for arg in argv):
        return True
    try:
        config = yaml.safe_load(_config_file(argv).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # the pipeline reports a missing or broken config file itself
    return isinstance(config, dict) and any(config.get(flag) is not None for flag in PRECISION_FLAGS)


def demo_argv(argv: list[str]) -> list[str]:
    """The command line, plus `--bf16 true` on a CPU with bf16 instructions (AVX-512 BF16, AMX) unless the command
    line or the config file sets `bf16` or `fp16`: there the demo runs in bf16 autocast, in less CPU time,
    and prints the same conclusion as in fp32 (README, Results); elsewhere it stays fp32."""
    if _precision_chosen(argv):
        return argv
    if training_on_cpu(use_cpu=False) and cpu_has_fast_bf16():
        return [*argv, "--bf16", "true"]
    return argv


if __name__ == "__main__":
    main(demo_argv(sys.argv[1:]), default_config=str(DEFAULT_CONFIG))
