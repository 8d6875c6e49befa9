"""Stable import path of the coherent reward as a TRL reward callable (`make_coherent_reward_func`).

The code lives in `srppo_trl.rewards.reward_funcs`.
"""

from .rewards.reward_funcs import make_coherent_reward_func


__all__ = ["make_coherent_reward_func"]
