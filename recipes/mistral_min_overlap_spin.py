"""SPIN baseline: Mistral-7B, minimum overlap: SFT on TULU-v2-mix, then SPIN's first iteration on the same data.

Single device (LoRA/QLoRA advised below 80 GB; see the YAML):

    python recipes/mistral_min_overlap_spin.py --config recipes/configs/mistral_min_overlap_spin.yaml

8 GPUs (the SPIN batch of 64 assumes 8 processes):

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml recipes/mistral_min_overlap_spin.py \
        --config recipes/configs/mistral_min_overlap_spin.yaml

Override any field on the command line, e.g. `--spin_iterations 2 --sft_model outputs/mistral_min_overlap/sft`.
"""

from pathlib import Path

from srppo_trl.pipeline import main


if __name__ == "__main__":
    main(default_config=str(Path(__file__).parent / "configs" / "mistral_min_overlap_spin.yaml"))
