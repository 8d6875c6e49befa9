"""RL correctness of SRPPOTrainer: each test here failed on the trainer before the fixes it names.

- rollouts sample exactly softmax(logits / T), whatever the checkpoint's generation_config.json says;
- the actor's learning-rate schedule starts at its first update, after the critic warm-up (and resumes exactly);
- token-level reward + reward_clip clips each token; the missing-EOS penalty alone lands on the last token;
- stop_token=None generates to full length;
- actor and critic gradients are clipped separately;
- prompts keep the BOS the tokenizer adds to text, in the trainer and in SFT's chat template;
- advantages are whitened with statistics of the whole rollout buffer;
- `policy/entropy_avg` is the entropy of the sampling distribution.

Shrunk hyper-parameters as in test_trainer.py: responses of 1-8 tokens, rollout batches of 4-8 prompts, learning
rates of 1e-3 so a few steps move a tiny model.
"""

import copy

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, TrainerCallback

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.data.tokenization import bos_token_added_to_text, ensure_chat_template_bos, tokenize_prompt
from srppo_trl.models.logprobs import sequence_logprobs
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer
from srppo_trl.trainer import ppo_math
from srppo_trl.trainer.rollout import RolloutBuffer, response_mask_after_stop, sample_responses


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


_prompts = tiny_prompts  # shared with the other trainer tests (srppo_trl.testing)
_args = tiny_srppo_config


def _trainer(tokenizer, tmp_path, policy=None, dataset=None, **overrides):
    sft, pt = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)
    policy = policy if policy is not None else tiny_causal_lm(tokenizer, seed=1)
    return SRPPOTrainer(
        args=_args(tmp_path, **overrides),
        processing_class=tokenizer,
        model=policy,
        reward_model=CoherentRewardModel(sft, pt),
        train_dataset=dataset if dataset is not None else _prompts(),
    )


def _checkpoint_with_sampling_defaults(tokenizer, folder, uniform=False):
    """A policy saved with a generation_config.json that would change sampling if it were inherited."""
    model = tiny_causal_lm(tokenizer, seed=1)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # logits 0: the full softmax is flat over the vocabulary
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.do_sample = True
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def _batch(trainer, n, prompt="What is 1 plus 1?"):
    ids = tokenize_prompt(trainer.processing_class, [{"role": "user", "content": prompt}])
    input_ids = torch.tensor([ids] * n)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# ---------------------------------------------------------------------------------------------- 1. sampling


def test_rollouts_sample_the_full_softmax_whatever_the_checkpoint_says(tokenizer, tmp_path):
    policy = _checkpoint_with_sampling_defaults(tokenizer, tmp_path / "policy", uniform=True)
    assert policy.generation_config.top_k == 3
    trainer = _trainer(tokenizer, tmp_path / "run", policy=policy, response_length=1)
    torch.manual_seed(0)
    first = trainer.generate_rollouts(_batch(trainer, 512)).response[:, 0]
    # A flat distribution over ~385 tokens gives ~280 distinct tokens in 512 draws; top-k 3 would give at most 3.
    assert len(set(first.tolist())) > 150
    assert policy.generation_config.top_k == 3  # the checkpoint's own config is left as it was


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_teacher_forced_ones(tokenizer, tmp_path, temperature, sampler):
    policy = _checkpoint_with_sampling_defaults(tokenizer, tmp_path / "policy")
    trainer = _trainer(tokenizer, tmp_path / "run", policy=policy, temperature=temperature)
    batch = _batch(trainer, 16)
    torch.manual_seed(0)
    response, behaviour = sample_responses(
        policy,
        batch["input_ids"],
        batch["attention_mask"],
        trainer.generation_config,
        8,
        tokenizer.pad_token_id,
        True,
        sampler=sampler,
    )
    response_mask, has_stop = response_mask_after_stop(response, trainer.args.stop_token_id)
    rollouts = RolloutBuffer(query=batch["input_ids"], query_mask=batch["attention_mask"], response=response,
                             response_mask=response_mask, has_stop=has_stop)  # fmt: skip
    scored = trainer.score_rollouts(rollouts)
    mask = rollouts.response_mask.bool()
    torch.testing.assert_close(scored.logprobs[mask], behaviour[mask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- 2. schedules


class _LearningRates(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.rows = trainer, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        groups = self.trainer.optimizer.param_groups
        self.rows.append({g["srppo_role"]: g["lr"] for g in groups})


def test_actor_schedule_starts_at_its_first_update_after_the_critic_warmup(tokenizer, tmp_path):
    trainer = _trainer(
        tokenizer,
        tmp_path,
        critic_warmup_steps=2,
        max_steps=4,
        lr_scheduler_type="linear",
        learning_rate=1e-3,
        critic_learning_rate=2e-3,
    )
    spy = _LearningRates(trainer)
    trainer.add_callback(spy)
    trainer.train()
    actor = [row["actor"] for row in spy.rows]
    critic = [row["critic"] for row in spy.rows]
    # Actor: frozen for 2 buffers, then its own linear decay over its 2 updates, from the peak.
    assert actor == pytest.approx([0.0, 0.0, 1e-3, 0.5e-3])
    # Critic: linear decay over all 4 steps.
    assert critic == pytest.approx([2e-3, 1.5e-3, 1e-3, 0.5e-3])


def test_both_schedules_resume_exactly(tokenizer, tmp_path):
    common = dict(critic_warmup_steps=1, max_steps=4, lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
    full = _trainer(tokenizer, tmp_path / "full", **common)
    spy_full = _LearningRates(full)
    full.add_callback(spy_full)
    full.train()
    resumed = _trainer(tokenizer, tmp_path / "full", **common)  # same output_dir: resume from checkpoint-2
    spy_resumed = _LearningRates(resumed)
    resumed.add_callback(spy_resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert spy_resumed.rows == spy_full.rows[2:]


# ---------------------------------------------------------------------------------------------- 3. token-level clip


def test_token_level_reward_is_clipped_per_token_and_the_eos_penalty_lands_alone(tokenizer, tmp_path):
    clip, penalty, kl_coef = 0.05, 1.0, 0.2
    trainer = _trainer(
        tokenizer,
        tmp_path,
        reward_granularity="token",
        reward_clip=clip,
        missing_eos_penalty=penalty,
        kl_coef=kl_coef,
        response_length=4,  # most responses are truncated: the penalty applies
    )
    torch.manual_seed(0)
    buffer = trainer.compute_advantages(trainer.score_rollouts(trainer.generate_rollouts(_batch(trainer, 8))))
    query, response = buffer.query, buffer.response
    mask = buffer.response_mask
    input_ids = torch.cat([query, response], 1)
    attention = torch.cat([buffer.query_mask, mask], 1)
    full_mask = torch.cat([torch.zeros_like(query), mask], 1)
    reward = trainer.reward_model
    per_token = (
        sequence_logprobs(reward.sft_model, input_ids, attention, full_mask)
        - sequence_logprobs(reward.base_model, input_ids, attention, full_mask)
    )[:, query.shape[1] :]
    assert per_token.abs().max() > clip  # the clip binds somewhere, or the test proves nothing
    expected = -kl_coef * buffer.kl + per_token.clamp(-clip, clip) * mask
    last = mask.sum(-1) - 1
    rows = torch.arange(len(mask))
    expected[rows, last] -= penalty * (~buffer.has_stop).float()
    assert (~buffer.has_stop).any()
    torch.testing.assert_close(buffer.rewards, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        buffer.scores, (per_token.clamp(-clip, clip) * mask).sum(-1) - penalty * (~buffer.has_stop).float()
    )


def test_token_granularity_needs_the_coherent_reward(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with pytest.raises(ValueError, match="reward_granularity='token' needs the coherent reward"):
        SRPPOTrainer(
            args=_args(tmp_path, reward_granularity="token"),
            processing_class=tokenizer,
            model=tiny_causal_lm(tokenizer, seed=1),
            ref_model=tiny_causal_lm(tokenizer, seed=1),
            reward_model=AutoModelForSequenceClassification.from_config(config),
            train_dataset=_prompts(),
        )


# ---------------------------------------------------------------------------------------------- 4. stop_token=None


def _force_eos(model, eos_id, boost=50.0):
    def hook(module, inputs, output):
        output = output.clone()
        output[..., eos_id] += boost
        return output

    return model.lm_head.register_forward_hook(hook)


def test_stop_token_none_generates_to_full_length(tokenizer, tmp_path):
    policy = tiny_causal_lm(tokenizer, seed=1)
    policy.generation_config.eos_token_id = tokenizer.eos_token_id  # what a checkpoint would say
    _force_eos(policy, tokenizer.eos_token_id)
    trainer = _trainer(tokenizer, tmp_path, policy=policy, stop_token=None, response_length=6)
    out = trainer.generate_rollouts(_batch(trainer, 4))
    assert out.response.shape == (4, 6)
    assert (out.response == tokenizer.eos_token_id).all()  # EOS sampled, but it does not end the response
    assert out.response_mask.all() and not out.has_stop.any()


def test_stop_token_eos_stops_at_the_first_eos(tokenizer, tmp_path):
    policy = tiny_causal_lm(tokenizer, seed=1)
    _force_eos(policy, tokenizer.eos_token_id)
    trainer = _trainer(tokenizer, tmp_path, policy=policy, response_length=6)
    out = trainer.generate_rollouts(_batch(trainer, 4))
    assert out.has_stop.all()
    assert out.response_mask.sum(-1).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- 5. gradient clipping


def test_actor_and_critic_gradients_are_clipped_separately(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, max_grad_norm=1.0)
    model = trainer.model
    critic_ids = {id(p) for p in model.value_model.parameters()}
    actor = [p for p in model.parameters() if id(p) not in critic_ids]
    critic = [p for p in model.parameters() if id(p) in critic_ids]
    for params, norm in ((actor, 0.5), (critic, 100.0)):
        total = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.full_like(p, norm / total**0.5)
    actor_before = [p.grad.clone() for p in actor]
    returned = trainer._clip_grad_norm(model)
    assert float(returned) == pytest.approx(0.5, rel=1e-4)  # the actor's norm is what `grad_norm` logs
    for p, g in zip(actor, actor_before):
        assert torch.equal(p.grad, g)  # below max_grad_norm: untouched by the critic's huge gradient
    critic_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in critic]))
    assert float(critic_norm) == pytest.approx(1.0, rel=1e-3)
    assert trainer._metrics["train"]["critic/grad_norm"][-1] == pytest.approx(100.0, rel=1e-3)


# ---------------------------------------------------------------------------------------------- 6. BOS


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tokenizer that adds a BOS to plain text, like Llama-3's and Mistral's, with TULU's template (no BOS)."""
    from importlib import resources

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = resources.files("srppo_trl").joinpath("chat_templates", "tulu.jinja").read_text()
    return tok


def test_chat_prompts_keep_the_bos_the_tokenizer_adds_to_text(bos_tokenizer, tmp_path):
    tok = copy.deepcopy(bos_tokenizer)
    bos = tok.bos_token_id
    assert bos_token_added_to_text(tok) == bos
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenize_prompt(tok, messages)
    assert ids[0] == bos and ids.count(bos) == 1
    # SFT tokenizes through the chat template: after ensure_chat_template_bos it renders the same BOS-led prefix.
    assert ensure_chat_template_bos(tok) is True
    assert ensure_chat_template_bos(tok) is False  # idempotent
    sft_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(sft_ids["input_ids"]) == ids == tokenize_prompt(tok, messages)  # no double BOS either


def test_trainer_prompts_start_with_bos(bos_tokenizer, tmp_path):
    tok = copy.deepcopy(bos_tokenizer)
    trainer = _trainer(tok, tmp_path)
    first_tokens = {row[0] for row in trainer.train_dataset["input_ids"]}
    assert first_tokens == {tok.bos_token_id}


def test_no_bos_is_added_for_tokenizers_that_add_none(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert bos_token_added_to_text(tokenizer) is None
    assert tokenize_prompt(tokenizer, messages) == list(rendered["input_ids"])


def test_pipeline_tokenizer_gets_the_bos_in_its_chat_template(bos_tokenizer, tmp_path):
    from srppo_trl.pipeline.run import load_tokenizer

    tok = copy.deepcopy(bos_tokenizer)
    tok.chat_template = None  # a base model without a template: the pipeline sets TULU's
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<s>")


# ---------------------------------------------------------------------------------------------- 7. whitening


def test_whitening_with_summed_moments_equals_whitening_the_whole_buffer():
    torch.manual_seed(0)
    values, mask = torch.randn(8, 5) * 3 + 2, torch.rand(8, 5) > 0.3
    whole = ppo_math.masked_whiten(values, mask)
    moments = ppo_math.masked_moments(values[:4], mask[:4]) + ppo_math.masked_moments(values[4:], mask[4:])
    mean, var = ppo_math.moments_to_mean_var(moments)
    torch.testing.assert_close(mean.float(), ppo_math.masked_mean(values, mask))
    torch.testing.assert_close(var.float(), ppo_math.masked_var(values, mask))
    halves = [ppo_math.masked_whiten(values[s], mask[s], mean=mean, var=var) for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(torch.cat(halves), whole)
    # Whitening each half alone is what the per-process code did: a different result.
    alone = torch.cat([ppo_math.masked_whiten(values[s], mask[s]) for s in (slice(0, 4), slice(4, 8))])
    assert not torch.allclose(alone, whole)


def test_moments_of_an_empty_mask_give_zero_mean_and_variance():
    mean, var = ppo_math.moments_to_mean_var(ppo_math.masked_moments(torch.ones(2, 3), torch.zeros(2, 3)))
    assert mean.item() == 0.0 and var.item() == 0.0


# ---------------------------------------------------------------------------------------------- 8. entropy


def test_entropy_metric_is_the_entropy_of_the_sampling_distribution(tokenizer, tmp_path):
    policy = tiny_causal_lm(tokenizer, seed=1)
    _force_eos(policy, tokenizer.eos_token_id, boost=6.0)  # peaked: entropy and sampled-token NLL differ
    trainer = _trainer(tokenizer, tmp_path, policy=policy, max_steps=1, temperature=0.8, stop_token=None)
    start = copy.deepcopy(trainer.model)
    buffers = []
    original = trainer.make_rollout_buffer
    trainer.make_rollout_buffer = lambda batch: buffers.append(original(batch)) or buffers[-1]
    trainer.train()
    logged = trainer.state.log_history[0]["policy/entropy_avg"]
    buffer = buffers[0]
    input_ids = torch.cat([buffer.query, buffer.response], 1)
    attention = torch.cat([buffer.query_mask, buffer.response_mask], 1)
    width = buffer.response.shape[1]
    with torch.no_grad():
        logits, _ = start(input_ids=input_ids, attention_mask=attention, logits_to_keep=width + 1)
    entropy = torch.distributions.Categorical(logits=logits[:, :-1].float() / 0.8).entropy()
    expected = ppo_math.masked_mean(entropy, buffer.response_mask).item()
    assert logged == pytest.approx(expected, rel=1e-4)
    nll = -ppo_math.masked_mean(buffer.logprobs, buffer.response_mask).item()
    assert abs(nll - expected) > 0.1  # the old metric (sampled-token NLL) is measurably different here


# ---------------------------------------------------------------------------------------------- evaluation sampling


def test_greedy_evaluation_ignores_the_checkpoints_generation_settings(tokenizer, tmp_path):
    from srppo_trl.evaluation.generation import generate_responses

    plain = tiny_causal_lm(tokenizer, seed=3)
    with_settings = copy.deepcopy(plain)
    with_settings.generation_config.repetition_penalty = 5.0
    with_settings.generation_config.no_repeat_ngram_size = 1
    prompts = [f"What is {i} plus {i}?" for i in range(4)]
    expected = generate_responses(plain, tokenizer, prompts, max_new_tokens=12, show_progress=False)
    assert generate_responses(with_settings, tokenizer, prompts, max_new_tokens=12, show_progress=False) == expected


def test_diagnostic_samples_come_from_the_full_softmax(tokenizer, tmp_path):
    from srppo_trl.evaluation.reward_diagnostics import sample_responses as diagnostic_samples

    policy = _checkpoint_with_sampling_defaults(tokenizer, tmp_path / "policy", uniform=True)
    _, ids = diagnostic_samples(policy, tokenizer, ["hi"] * 256, max_new_tokens=1, batch_size=64, show_progress=False)
    assert len({row[0] for row in ids}) > 100  # top-k 3 from generation_config.json would give at most 3


def test_actor_schedule_offset_counts_every_optimizer_step_of_the_warmup_buffers(tokenizer, tmp_path):
    # 2 optimizer steps per buffer (2 PPO epochs): 1 warm-up buffer = 2 steps at lr 0, then the actor's own decay.
    trainer = _trainer(
        tokenizer, tmp_path, critic_warmup_steps=1, num_ppo_epochs=2, max_steps=4, lr_scheduler_type="linear"
    )
    spy = _LearningRates(trainer)
    trainer.add_callback(spy)
    trainer.train()
    assert [row["actor"] for row in spy.rows] == pytest.approx([0.0, 0.0, 1e-3, 0.5e-3])
    assert [row["critic"] for row in spy.rows] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_an_optimizer_given_by_the_user_is_used_as_given(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, critic_warmup_steps=1)
    mine = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.optimizer = mine
    assert trainer.create_optimizer() is mine and len(mine.param_groups) == 1
    scheduler = trainer.create_scheduler(num_training_steps=4, optimizer=mine)  # one shared schedule, no error
    assert len(scheduler.base_lrs) == 1


def test_max_steps_set_after_the_config_is_built_sets_the_training_length(tokenizer, tmp_path):
    args = tiny_srppo_config(tmp_path, max_steps=-1)
    args.max_steps = 2  # as the notebook's smoke run does
    trainer = SRPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2)),
        train_dataset=tiny_prompts(),
    )
    assert trainer.args.num_total_batches == 2 and trainer.args.total_episodes == 8
    trainer.train()
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------- critic value head


def _head(critic):
    from srppo_trl.models.modeling import value_head_parameters

    head = value_head_parameters(critic)
    weight = next(p for n, p in head.items() if n.endswith("weight"))
    bias = [p for n, p in head.items() if n.endswith("bias")]
    return weight, bias


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_value_head_has_openrlhfs_init_and_the_backbone_is_the_sft_models(tokenizer, tmp_path, kind):
    """The critic's new head is N(0, 1/(hidden+1)) (OpenRLHF), not transformers' N(0, 0.02), from a path or a model."""
    from srppo_trl.models.modeling import build_value_model

    hidden = 512
    sft = tiny_causal_lm(tokenizer, kind=kind, seed=1, hidden_size=hidden, num_layers=1)
    sft.save_pretrained(tmp_path / "sft")
    for source in (sft, str(tmp_path / "sft")):
        torch.manual_seed(0)
        critic = build_value_model(source)
        weight, bias = _head(critic)
        assert weight.numel() == hidden
        # 512 draws: the sample std is within ~10% of 1/513 = 0.00195; the old init gave ~0.02
        assert 0.8 / (hidden + 1) < weight.std().item() < 1.2 / (hidden + 1)
        assert all(torch.count_nonzero(b) == 0 for b in bias)
        backbone = {k: v for k, v in critic.state_dict().items() if k.startswith(critic.base_model_prefix + ".")}
        assert backbone and all(torch.equal(v, sft.state_dict()[k]) for k, v in backbone.items())


def test_a_saved_critic_keeps_its_trained_head(tokenizer, tmp_path):
    from srppo_trl.models.modeling import build_value_model

    tiny_causal_lm(tokenizer, seed=1).save_pretrained(tmp_path / "sft")
    critic = build_value_model(str(tmp_path / "sft"))
    weight, _ = _head(critic)
    with torch.no_grad():
        weight.fill_(0.5)
    critic.save_pretrained(tmp_path / "critic")
    reloaded, _ = _head(build_value_model(str(tmp_path / "critic")))
    assert torch.all(reloaded == 0.5)


def test_single_base_value_head_has_openrlhfs_init(tokenizer):
    peft = pytest.importorskip("peft")
    from srppo_trl.models.single_base import build_single_base

    hidden = 512
    base = tiny_causal_lm(tokenizer, seed=1, hidden_size=hidden, num_layers=1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _policy, _reward, critic = build_single_base(base, sft_adapter=peft.get_peft_model(base, config))
    assert 0.8 / (hidden + 1) < critic.score.weight.std().item() < 1.2 / (hidden + 1)


# ---------------------------------------------------------------------------------------------- 7. value clip


def _fake_buffer(values, returns, warmup=False):
    rows, length = values.shape
    mask = torch.ones(rows, length)
    mask[:, -1] = 0  # padding: its (huge, opposite) errors must not count
    returns = returns.clone()
    returns[:, -1] = -1000.0
    return RolloutBuffer(
        query=torch.zeros(rows, 1, dtype=torch.long),
        query_mask=torch.ones(rows, 1, dtype=torch.long),
        response_mask=mask,
        response=torch.zeros(rows, length, dtype=torch.long),
        scores=torch.zeros(rows),
        kl=torch.zeros(rows, length),
        rewards=torch.zeros(rows, length),
        logprobs=torch.zeros(rows, length),
        values=values,
        returns=returns,
        has_stop=torch.ones(rows),
        warmup=warmup,
    )


@pytest.mark.parametrize("clip, warns", [(0.2, True), (None, False), (5.0, False)])
def test_a_value_clip_far_below_the_critics_bias_is_warned_about_once(tokenizer, tmp_path, caplog, clip, warns):
    trainer = _trainer(tokenizer, tmp_path, cliprange_value=clip)
    biased = _fake_buffer(values=torch.zeros(2, 4), returns=torch.full((2, 4), 15.0))  # 15 nats off, as measured
    with caplog.at_level("WARNING", logger="srppo_trl.trainer"):
        for _ in range(3):  # critic warm-up buffers never count
            trainer._log_rollout_metrics(_fake_buffer(torch.zeros(2, 4), torch.full((2, 4), 15.0), warmup=True))
        for _ in range(2):
            trainer._log_rollout_metrics(biased)
        assert not [r for r in caplog.records if "cliprange_value" in r.getMessage()]  # 2 buffers: not yet
        for _ in range(3):
            trainer._log_rollout_metrics(biased)
    warnings = [r for r in caplog.records if "cliprange_value" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)
    assert trainer._metrics["train"]["val/bias"] == [pytest.approx(15.0)] * 8
    assert trainer._metrics["train"]["val/abs_error"] == [pytest.approx(15.0)] * 8
    assert trainer._metrics["train"]["val/returns_spread"] == [pytest.approx(0.0)] * 8  # constant returns


def test_a_critic_with_no_bias_is_not_warned_about(tokenizer, tmp_path, caplog):
    # lam=1 and a fitted critic: returns spread +-15 around the values, no bias.
    trainer = _trainer(tokenizer, tmp_path, cliprange_value=0.2)
    returns = torch.tensor([[15.0, 15.0, 15.0, 0.0], [-15.0, -15.0, -15.0, 0.0]])
    with caplog.at_level("WARNING", logger="srppo_trl.trainer"):
        for _ in range(5):
            trainer._log_rollout_metrics(_fake_buffer(torch.zeros(2, 4), returns))
    assert not [r for r in caplog.records if "cliprange_value" in r.getMessage()]
    assert trainer._metrics["train"]["val/abs_error"][-1] == pytest.approx(15.0)
    # Returns of +15 and -15 around their mean 0 (padding excluded): a constant critic's error is 15 too.
    assert trainer._metrics["train"]["val/returns_spread"][-1] == pytest.approx(15.0)
