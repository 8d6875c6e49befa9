"""Numerics of the trainer: the actor's optimizer state after the critic warm-up, mixed precision of the frozen
passes, the value head's precision, dropout in the scoring passes, and the metrics logged around an evaluation.

Shrunk as in test_trainer.py: tiny models, 8-token responses, rollout batches of 4 prompts.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.models.single_base import build_single_base
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _trainer(tokenizer, tmp_path, policy=None, reward=None, value_model=None, **overrides):
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    return SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy if policy is not None else tiny_causal_lm(tokenizer, seed=1),
        reward_model=reward if reward is not None else CoherentRewardModel(sft, pt),
        train_dataset=tiny_prompts(),
        value_model=value_model,
        eval_dataset=overrides.get("eval_strategy") and tiny_prompts(4),
    )


# ---------------------------------------------------------------------- evaluation during training


def test_evaluation_during_training_leaves_the_pending_train_metrics_to_the_train_row(tokenizer, tmp_path):
    # 2 optimizer steps per buffer, a train row every 2 steps, an evaluation after step 1: the buffer's rollout
    # metrics (gathered at step 1) are still pending when the evaluation logs.
    trainer = _trainer(
        tokenizer, tmp_path, num_ppo_epochs=2, logging_steps=2, eval_strategy="steps", eval_steps=1, max_steps=2
    )
    trainer.train()
    eval_rows = [row for row in trainer.state.log_history if "eval_objective/scores" in row]
    train_rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(eval_rows) == 2 and len(train_rows) == 1
    assert all(key.startswith("eval_") for row in eval_rows for key in row if key not in ("epoch", "step")), eval_rows
    for key in ("objective/scores", "objective/kl", "completions/mean_length", "loss/policy_avg", "val/ratio"):
        assert key in train_rows[0], key


# ---------------------------------------------------------------------- the actor's optimizer state after the warm-up


class _ZeroGradsDuringWarmup(TrainerCallback):
    """What DeepSpeed's flat partitions do during the critic warm-up: the actor's parameters hold zero gradients
    (under DDP or one process they hold none, and AdamW skips them)."""

    def __init__(self):
        self.trainer = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._in_critic_warmup():
            for param in self.trainer.model.policy.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)


@pytest.mark.parametrize("zero_grads", [False, True])
def test_first_actor_step_after_the_warmup_is_a_fresh_adam_step(tokenizer, tmp_path, zero_grads):
    # 1 warm-up buffer of 2 optimizer steps, then the first actor step; a constant learning rate, so a fresh Adam
    # step moves each weight by lr (its first update is lr * g / (|g| + eps)).
    callback = _ZeroGradsDuringWarmup()
    trainer = _trainer(
        tokenizer, tmp_path, critic_warmup_steps=1, num_ppo_epochs=2, max_steps=3, lr_scheduler_type="constant"
    )
    callback.trainer = trainer
    if zero_grads:
        trainer.add_callback(callback)
    before = {n: p.detach().clone() for n, p in trainer.model.policy.named_parameters()}
    trainer.train()
    steps, moved = set(), []
    for name, param in trainer.model.policy.named_parameters():
        steps.add(int(trainer.optimizer.state[param]["step"]))
        change = (param.detach() - before[name]).abs()
        moved.append(change[change > 0])
    assert steps == {1}  # one actor step, whatever the warm-up did
    ratio = torch.cat(moved).median().item() / trainer.args.learning_rate
    assert ratio == pytest.approx(1.0, abs=0.01)  # a stale step count of 3 with zero moments would give 0.64


# ---------------------------------------------------------------------- the value head's precision


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _single_base_roles(tokenizer, base, critic_top_layers=None):
    """`build_single_base` over `base` with a non-zero SFT adapter (a trained adapter's stand-in)."""
    sft = get_peft_model(base, _lora())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return build_single_base(sft, critic_top_layers=critic_top_layers)


def _bf16_trainer(tokenizer, tmp_path, mode, **overrides):
    def bf16(seed):
        return tiny_causal_lm(tokenizer, seed=seed).to(torch.bfloat16)

    if mode == "four_model":
        return _trainer(tokenizer, tmp_path, bf16(1), CoherentRewardModel(bf16(1), bf16(2)), **overrides)
    policy, reward, critic = _single_base_roles(tokenizer, bf16(2))
    return SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )


@pytest.mark.parametrize("mode", ["four_model", "single_base"])
def test_a_small_critic_update_of_a_bf16_model_moves_its_value_head(tokenizer, tmp_path, mode):
    # One critic step at lr 1e-5 (the paper's critic lr is 9e-6): Adam moves each head weight by ~1e-5, below half a
    # bf16 ulp of weights of |w| ~ 1/33 (6e-5).
    trainer = _bf16_trainer(tokenizer, tmp_path, mode, critic_learning_rate=1e-5, critic_warmup_steps=1, max_steps=1)
    head = trainer.model.value_model.score  # the Llama token classifier's head and the single-base head alike
    before = head.weight.detach().clone()
    trainer.train()
    assert (head.weight.detach() != before.to(head.weight.dtype)).all()
    assert head.weight.dtype == torch.float32
    values = trainer.model.value_model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert values.dtype == torch.float32


# ---------------------------------------------------------------------- dropout configured by floats


def _tiny_opt(tokenizer, seed, dropout=0.5, attention_dropout=0.5):
    """A tiny OPT whose dropout is configured by floats and applied functionally (`config.dropout`,
    `attention_dropout`), not by `nn.Dropout` modules."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        dropout=dropout,
        attention_dropout=attention_dropout,
        activation_dropout=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config)


def _opt_trainer(tokenizer, tmp_path, mode):
    if mode == "four_model":
        from transformers import OPTForSequenceClassification

        reward = CoherentRewardModel(_tiny_opt(tokenizer, 1), _tiny_opt(tokenizer, 2))
        config = _tiny_opt(tokenizer, 1).config
        config.num_labels = 1
        critic = OPTForSequenceClassification(config)  # OPT has no token classifier: TRL 1.12's critic
        return _trainer(tokenizer, tmp_path, _tiny_opt(tokenizer, 1), reward, critic)
    policy, reward, critic = _single_base_roles(tokenizer, _tiny_opt(tokenizer, 2))
    return SRPPOTrainer(
        args=tiny_srppo_config(tmp_path),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )


@pytest.mark.parametrize("mode", ["four_model", "single_base"])
def test_scoring_and_frozen_passes_are_deterministic_with_float_configured_dropout(tokenizer, tmp_path, mode):
    trainer = _opt_trainer(tokenizer, tmp_path, mode)
    trainer.model.train()  # as in a training step
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        rollouts = trainer.generate_rollouts(batch)
        first, second = trainer.score_rollouts(rollouts), trainer.score_rollouts(rollouts)
    for key in ("logprobs", "values", "ref_logprobs", "scores"):
        assert torch.equal(first[key], second[key]), key


def test_shared_lower_layers_are_not_eligible_under_float_configured_dropout(tokenizer):
    from srppo_trl.models.modeling import disable_dropout

    # `config.dropout` alone (residual dropout, applied functionally); the attention dropout, all that was checked,
    # is 0.
    base = _tiny_opt(tokenizer, 2, attention_dropout=0.0)
    policy, reward, critic = _single_base_roles(tokenizer, base, critic_top_layers=1)
    shared = critic.shared_lower_layers

    def eligible():
        with reward.sft_context():
            return shared._lower_layers_run_only_the_adapter()

    policy.train()
    assert not eligible()
    policy.eval()
    assert eligible()
    policy.train()
    disable_dropout(policy)
    assert eligible()


# ---------------------------------------------------------------------- one precision for trained and frozen passes


@pytest.mark.parametrize("critic_top_layers", [None, 1])
def test_kl_to_sft_is_zero_at_the_start_under_bf16_autocast(tokenizer, tmp_path, critic_top_layers, cpu_bf16):
    # Single-base: the policy adapter starts as a copy of the SFT adapter, so the policy IS the SFT model at step 0.
    # bf16=True runs the prepared policy/critic forward under CPU bf16 autocast; the SFT pass must run under it too.
    # With a top-layer critic the SFT pass fills the shared lower layers that the critic passes read.
    base = tiny_causal_lm(tokenizer, seed=2)
    policy, reward, critic = _single_base_roles(tokenizer, base, critic_top_layers=critic_top_layers)
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, bf16=True, use_cpu=True, max_steps=1),
        processing_class=tokenizer,
        model=policy,
        reward_model=reward,
        value_model=critic,
        train_dataset=tiny_prompts(),
    )
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
    buffers = []
    original = trainer.make_rollout_buffer
    trainer.make_rollout_buffer = lambda batch: buffers.append(original(batch)) or buffers[-1]
    trainer.train()
    buffer = buffers[0]
    assert buffer.response_mask.sum() > 0
    assert torch.equal(buffer.logprobs, buffer.ref_logprobs)
    assert trainer.state.log_history[0]["objective/kl"] == 0.0
    for key in ("logprobs", "ref_logprobs", "advantages", "returns", "values"):
        assert getattr(buffer, key).dtype == torch.float32, key
    if critic_top_layers is not None:
        assert critic.shared_lower_layers.hits > 0  # the critic read rows the autocast SFT pass cached


def test_shared_lower_layers_cache_keeps_autocast_and_full_precision_rows_apart(tokenizer):
    policy, reward, critic = _single_base_roles(tokenizer, tiny_causal_lm(tokenizer, seed=2), critic_top_layers=1)
    shared = critic.shared_lower_layers
    ids = torch.randint(5, len(tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, 5:] = 1
    with torch.no_grad(), shared.installed():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reward.sft_log_probs(ids, mask, response)  # fills the cache from a bf16 pass
        assert (shared.misses, shared.hits) == (1, 0)
        full = reward.sft_log_probs(ids, mask, response)  # fp32: must not read the bf16 rows
        assert (shared.misses, shared.hits) == (2, 0)
        assert torch.equal(full, reward.sft_log_probs(ids, mask, response))  # its own rows hit
        assert shared.hits == 1
