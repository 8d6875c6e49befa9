"""Reward callables for TRL's trainers: `reward_funcs.make_coherent_reward_func` (the coherent reward for
`GRPOTrainer` / `RLOOTrainer`). The reward *model* itself is `srppo_trl.models.coherent_reward.CoherentRewardModel`.
"""
