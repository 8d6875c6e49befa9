"""Learning check: SRPPO raises the coherent reward of the policy's own samples.

The SFT model is a randomly initialised tiny LM trained for a few steps (in the test) to answer every prompt with a
pattern the base model does not prefer; the policy starts from it. Shrunk: 12 SFT steps, 24 PPO steps with lr 3e-3
(the paper's actor lr is ~1e-8 on 7B models and thousands of prompts).
"""

import copy

import torch
from datasets import Dataset

from srppo_trl import CoherentRewardModel, SRPPOConfig, SRPPOTrainer
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


def _sft(model, tokenizer, prompts, answer, steps, lr=3e-3):
    """A few steps of plain maximum likelihood on (prompt, answer) pairs, answer tokens only."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    for step in range(steps):
        prompt = prompts[step % len(prompts)]
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_srppo_raises_the_mean_coherent_reward(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    base = tiny_causal_lm(tokenizer, seed=2)
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(16)]
    sft = _sft(base, tokenizer, prompts, "yes yes yes<|im_end|>", steps=12)
    reward = CoherentRewardModel(sft, base)
    args = SRPPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_ppo_epochs=2,
        response_length=6,
        learning_rate=3e-3,
        critic_learning_rate=3e-3,
        kl_coef=0.01,
        max_steps=24,
        # Defaults of SRPPOConfig before it took TRL 1.12 PPOConfig's (issue 14), pinned so this test is unchanged.
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
        per_device_eval_batch_size=16,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=copy.deepcopy(sft),
        reward_model=reward,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    eval_prompts = Dataset.from_dict({"prompt": prompts * 4})
    torch.manual_seed(1)
    before = trainer.evaluate(eval_prompts)["eval_objective/coherent_reward"]
    trainer.train()
    torch.manual_seed(1)
    after = trainer.evaluate(eval_prompts)["eval_objective/coherent_reward"]
    assert after > before + 1.0, (before, after)
