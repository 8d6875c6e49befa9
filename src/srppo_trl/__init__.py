"""srppo-trl: Self-Rewarding PPO (arXiv 2510.21090) on TRL.

Public API::

    from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer

The reward and the PPO math import with torch alone; the trainer (and TRL) load on first use.
"""

from importlib import import_module


__version__ = "0.1.0"

_LAZY = {
    "CoherentRewardModel": "srppo_trl.models.coherent_reward",
    "SRPPOConfig": "srppo_trl.trainer.config",
    "SRPPOTrainer": "srppo_trl.trainer.srppo_trainer",
    "build_value_model": "srppo_trl.models.modeling",
    "RolloutBuffer": "srppo_trl.trainer.rollout",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'srppo_trl' has no attribute {name!r}")
