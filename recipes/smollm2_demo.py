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

from srppo_trl.pipeline import main
from srppo_trl.precision import cpu_has_fast_bf16, training_on_cpu


def demo_argv(argv: list[str]) -> list[str]:
    """The command line, plus `--bf16 true` on a CPU with bf16 instructions (AVX-512 BF16, AMX) unless `--bf16` is
    given: there the demo runs in bf16 autocast, about 1.6x less CPU time, and prints the same conclusion as in fp32
    (docs/performance.md); elsewhere it stays fp32."""
    if any(arg == "--bf16" or arg.startswith("--bf16=") for arg in argv):
        return argv
    if training_on_cpu(use_cpu=False) and cpu_has_fast_bf16():
        return [*argv, "--bf16", "true"]
    return argv


if __name__ == "__main__":
    main(demo_argv(sys.argv[1:]), default_config=str(Path(__file__).parent / "configs" / "smollm2_demo.yaml"))
