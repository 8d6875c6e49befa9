"""The trainer: `SRPPOTrainer`, its config, and the phases of one update.

`srppo_trainer.py` holds the class and its `transformers.Trainer` overrides; `rollout.py` (and `vllm_rollout.py`)
generate, `scoring.py` scores, `ppo_step.py` computes advantages and losses with the pure functions of `ppo_math.py`;
`checkpointing.py` saves and resumes, `trl112_compat.py` adds TRL 1.12 `PPOTrainer`'s own API; `config.py`,
`field_ranges.py` and `precision.py` check the arguments.

`srppo_trl.trainer` is the stable import path of `SRPPOTrainer`, `SRPPOConfig` and `last_complete_checkpoint`. They
load on first use, so `srppo_trl.trainer.ppo_math` still imports with torch alone.
"""

from importlib import import_module


_LAZY = {
    "SRPPOTrainer": "srppo_trainer",
    "SRPPOConfig": "config",
    "last_complete_checkpoint": "checkpointing",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
