"""Stable import path of the coherent reward model (`from srppo_trl.coherent_reward import CoherentRewardModel`).

The code lives in `srppo_trl.models.coherent_reward`; like it, this module imports with torch alone.
"""

from .models.coherent_reward import CoherentRewardModel, check_same_tokenizer, check_same_vocabulary


__all__ = ["CoherentRewardModel", "check_same_tokenizer", "check_same_vocabulary"]
