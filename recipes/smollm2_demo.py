"""The small default: SFT -> SRPPO on SmolLM2-135M-Instruct with the shipped demo data, offline, on CPU.

Usage (single device, ~36 minutes on 2 idle CPU cores; this is what `make demo` runs):

    python recipes/smollm2_demo.py --config recipes/configs/smollm2_demo.yaml

Any field can be overridden on the command line, e.g. `--num_prompts 32 --offline_eval_n 0` for a 5-minute run.
With a GPU and accelerate:

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/smollm2_demo.py \
        --config recipes/configs/smollm2_demo.yaml
"""

from pathlib import Path

from srppo_trl.pipeline import main


if __name__ == "__main__":
    main(default_config=str(Path(__file__).parent / "configs" / "smollm2_demo.yaml"))
