"""SRPPO recipe: Mistral-7B, minimum overlap, single-base QLoRA on one GPU (one 4-bit copy of the base weights; SFT,
policy and critic as LoRA adapters).

    python recipes/mistral_min_overlap_qlora.py --config recipes/configs/mistral_min_overlap_qlora.yaml

On a GPU without bf16 (T4): add `--dtype float16 --bf16 false --fp16 true`. Single-base mode runs in one process
(DeepSpeed ZeRO-3 and FSDP are refused); the full-parameter recipe for 8 GPUs is recipes/mistral_min_overlap.py.
Resume a stopped run with the same command and `--resume_from_checkpoint true`.
"""

from pathlib import Path

from srppo_trl.pipeline import main


if __name__ == "__main__":
    main(default_config=str(Path(__file__).parent / "configs" / "mistral_min_overlap_qlora.yaml"))
