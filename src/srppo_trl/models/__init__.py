"""The networks SRPPO trains and scores with, and the model-level tricks that make them cheaper.

`modeling.py` (the critic and the policy + critic wrapper the optimizer trains), `coherent_reward.py` (the coherent
reward model: log p_SFT - log p_PT), `logprobs.py` (per-token log-probabilities), `single_base.py` (policy, critic
and reward on one copy of the base weights), `shared_lower_layers.py` (the SFT model's lower layers computed once for
a top-layer critic), `adapter_merge.py` (LoRA folded in for generation), `contiguous_lm_head.py` (a contiguous
LM-head input). Nothing here imports the trainer, the pipeline or the data code.
"""
