"""SRPPO recipe: Mistral-7B, medium overlap: TULU-v2-mix, then SFT on 9k UltraFeedback prompts with GPT-4 answers.

Single device (LoRA/QLoRA advised below 80 GB; see the YAML):

    python recipes/mistral_medium_overlap.py --config recipes/configs/mistral_medium_overlap.yaml

8 GPUs (the paper's batch sizes assume 8 processes):

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml recipes/mistral_medium_overlap.py \
        --config recipes/configs/mistral_medium_overlap.yaml

Override any field on the command line, e.g. `--kl_coef 0.5 --learning_rate 2e-8`.
"""

from pathlib import Path

from srppo_trl.pipeline import main


if __name__ == "__main__":
    main(default_config=str(Path(__file__).parent / "configs" / "mistral_medium_overlap.yaml"))
