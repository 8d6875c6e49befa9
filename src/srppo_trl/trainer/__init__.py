"""The trainer: `SRPPOTrainer`, its config, and the phases of one update.

`srppo_trainer.py` holds the class, every one of its `transformers.Trainer` overrides (`compute_loss`, the optimizers
and schedules, saving and resuming) and `make_rollout_buffer`; `rollout.py` (and `vllm_rollout.py`) generate,
`scoring.py` scores, `ppo_step.py` computes advantages and the policy and value losses with the pure functions of
`ppo_math.py`; `checkpointing.py` has the helpers that save and resume, `trl112_compat.py` adds TRL 1.12
`PPOTrainer`'s own API; `config.py`, `field_ranges.py` and `precision.py` check the arguments.

`srppo_trl.trainer` is the stable import path of every public name of `srppo_trl.trainer.srppo_trainer`
(`from srppo_trl.trainer import SRPPOTrainer, SRPPOConfig, last_complete_checkpoint`). They load on first use, so
`srppo_trl.trainer.ppo_math` still imports with torch alone.
"""

from importlib import import_module
from importlib.util import find_spec


def __getattr__(name):
    # A submodule imports as usual; any other public name is `srppo_trainer`'s, loaded on first use.
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is None:
        module = import_module(f"{__name__}.srppo_trainer")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
