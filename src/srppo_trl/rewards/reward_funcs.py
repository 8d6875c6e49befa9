"""The coherent reward as a reward *callable* for TRL's `GRPOTrainer` and `RLOOTrainer`.

The paper names GRPO, RLOO and REINFORCE as valid alternatives to PPO. TRL calls reward callables with the prompts,
the decoded completions and the `completion_ids`; an `nn.Module` reward would be re-tokenised from text instead, so the
coherent reward is wrapped in a plain function that scores the exact sampled token ids.
"""

from __future__ import annotations

import torch

from ..models.coherent_reward import CoherentRewardModel


def make_coherent_reward_func(reward_model: CoherentRewardModel, tokenizer, batch_size: int = 16):
    """Returns `coherent_reward(prompts, completions, completion_ids, **kwargs) -> list[float]`.

    Each prompt (text, or chat messages rendered with the tokenizer's chat template and generation prompt, as TRL does)
    is tokenised, the sampled `completion_ids` are appended unchanged, and the sequence-level coherent reward
    `log p_SFT(y|x) - log p_PT(y|x)` of the completion tokens is returned.
    """

    def coherent_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        device = next(reward_model.sft_model.parameters()).device
        scores = []
        for start in range(0, len(prompts), batch_size):
            rows = []
            for prompt, completion in zip(
                prompts[start : start + batch_size], completion_ids[start : start + batch_size]
            ):
                if isinstance(prompt, str):
                    prompt_ids = tokenizer(prompt)["input_ids"]
                else:
                    prompt_ids = tokenizer.apply_chat_template(
                        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
                    )["input_ids"]
                rows.append((list(prompt_ids), list(completion)))
            prompt_width = max(len(p) for p, _ in rows)
            completion_width = max(max(len(c) for _, c in rows), 1)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            input_ids, attention, response = [], [], []
            for prompt_ids, completion in rows:
                left, right = prompt_width - len(prompt_ids), completion_width - len(completion)
                input_ids.append([pad] * left + prompt_ids + completion + [pad] * right)
                attention.append([0] * left + [1] * (len(prompt_ids) + len(completion)) + [0] * right)
                response.append([0] * prompt_width + [1] * len(completion) + [0] * right)
            tensors = [torch.tensor(t, device=device) for t in (input_ids, attention, response)]
            scores.extend(reward_model(*tensors).tolist())
        return scores

    coherent_reward.__name__ = "coherent_reward"
    return coherent_reward
