"""Baseline recipe: PPO with the FsfairX-LLaMA3-RM preference reward model instead of the coherent reward (LLaMA3-8B).

Single device (LoRA/QLoRA advised below 80 GB; see the YAML):

    python recipes/llama3_ppo_preference_rm.py --config recipes/configs/llama3_ppo_preference_rm.yaml

8 GPUs (the paper's batch sizes assume 8 processes):

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml recipes/llama3_ppo_preference_rm.py \
        --config recipes/configs/llama3_ppo_preference_rm.yaml

Override any field on the command line, e.g. `--kl_coef 0.5 --learning_rate 2e-8`.
"""

from pathlib import Path

from srppo_trl.pipeline import main


if __name__ == "__main__":
    main(default_config=str(Path(__file__).parent / "configs" / "llama3_ppo_preference_rm.yaml"))
