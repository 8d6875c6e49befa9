"""Tiny models and a tokenizer built locally, for tests, benchmarks and docs examples (nothing from the hub).

tokenizer = tiny_tokenizer()                      # byte-level BPE, ChatML chat template, distinct pad and EOS
model = tiny_causal_lm(tokenizer, "llama")        # or "gpt2" (absolute positions)
"""

from __future__ import annotations

import torch


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea. Answer in lowercase letters only.",
    "What is 12 plus 7? The answer is 19.",
    "List three fruits: apple, banana, cherry.",
    "Explain why the sky is blue in one sentence.",
    "Translate hello into French: bonjour.",
    "Sure! Here is a friendly answer to your question.",
    "user assistant system question answer prompt response",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory on a fixed corpus (deterministic, ~50 ms).

    Pad is `<|endoftext|>`, EOS is `<|im_end|>` (as in SmolLM2's chat format once its pad token is fixed), left
    padding, ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_causal_lm(tokenizer, kind: str = "llama", seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised causal LM of a few hundred thousand parameters, built from a config."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    elif kind == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512, **ids)
    else:
        raise ValueError(f"kind must be 'llama' or 'gpt2', got {kind!r}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_prompts(n: int = 8):
    """`n` chat prompts in TRL's prompt-only format."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)]})


def tiny_srppo_config(output_dir, **overrides):
    """An `SRPPOConfig` for tiny models on CPU: seconds per run.

    Shrunk: responses of 8 tokens (the paper samples up to 1024), mini batches of 4 prompts (paper: 128), learning
    rates of 1e-3 (paper: ~1e-8 actor, 9e-6 critic) so that two optimizer steps visibly move a tiny model. Pinned to
    the values the tests were written for (TRL 1.12's PPOConfig defaults differ): one PPO epoch, temperature 1, stop
    at EOS, no activation checkpointing, a log line per step, no sample tables.
    """
    from .trainer.config import SRPPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        response_length=8,
        learning_rate=1e-3,
        critic_learning_rate=1e-3,
        max_steps=2,
        num_ppo_epochs=1,
        temperature=1.0,
        stop_token="eos",
        activation_checkpointing=False,
        logging_steps=1,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    kwargs.update(overrides)
    return SRPPOConfig(**kwargs)


def tiny_srppo_trainer(tokenizer, output_dir, **overrides):
    """An `SRPPOTrainer` on tiny models: policy and SFT from seed 1, pretrained from seed 2, `tiny_prompts()`, and
    `tiny_srppo_config(output_dir, **overrides)`; the critic's fresh value head from torch seed 0."""
    import torch

    from .models.coherent_reward import CoherentRewardModel
    from .trainer.srppo_trainer import SRPPOTrainer

    torch.manual_seed(0)  # the critic's fresh value head
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    return SRPPOTrainer(
        args=tiny_srppo_config(output_dir, **overrides),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(sft, pt),
        train_dataset=tiny_prompts(),
    )


def tiny_single_base_trainer(tokenizer, output_dir, sft=None, **overrides):
    """An `SRPPOTrainer` in single-base mode: `sft` (default: a tiny model from seed 2 with a random LoRA on q_proj
    and v_proj) split by `build_single_base` into policy, coherent reward and critic, `tiny_prompts()`, and
    `tiny_srppo_config(output_dir, **overrides)`; the critic's fresh value head from torch seed 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .models.single_base import build_single_base
    from .trainer.srppo_trainer import SRPPOTrainer

    if sft is None:
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        sft = get_peft_model(tiny_causal_lm(tokenizer, seed=2), lora)
    torch.manual_seed(0)
    policy, reward, critic = build_single_base(sft)
    return SRPPOTrainer(
        args=tiny_srppo_config(output_dir, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )
