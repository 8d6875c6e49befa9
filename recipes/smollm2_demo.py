"""The small default: SFT -> SRPPO on SmolLM2-135M-Instruct with the shipped demo data, offline, on CPU.

Usage (single device, ~36 minutes on 2 idle AVX2 CPU cores in fp32, ~11 minutes on an AMX VM; this is what
`make demo` runs; `--bf16 true` runs it in bf16 autocast on a CPU with AVX-512 BF16/AMX):

    python recipes/smollm2_demo.py --config recipes/configs/smollm2_demo.yaml

Any field can be overridden on the command line, e.g. `--num_prompts 32 --offline_eval_n 0` for a 5-minute run.
With a GPU and accelerate:

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/smollm2_demo.py \
        --config recipes/configs/smollm2_demo.yaml
"""

import sys
from pathlib import Path

from srppo_trl.pipeline import main


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2_demo.yaml"


if __name__ == "__main__":
    # fp32 on a CPU unless `--bf16 true` is given: on an AMX VM the demo in bf16 autocast did not always print the
    # fp32 run's conclusion (docs/benchmarks.md, the demo), so it does not pick bf16 by itself.
    main(sys.argv[1:], default_config=str(DEFAULT_CONFIG))
