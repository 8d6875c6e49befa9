"""Reward diagnostics: the statistics on constructed cases, the encoding layout, and end-to-end runs on tiny models."""

import json

import numpy as np
import pytest
import torch

from srppo_trl.evaluation.reward_diagnostics import (
    RewardDiagnosticsCallback,
    average_ranks,
    compute_diagnostics,
    derangement,
    encode_prompt_response,
    main,
    paired_win_rate,
    pearson,
    rank_auc,
    run_reward_diagnostics,
    score_responses,
    shuffle_responses,
    spearman,
)
from srppo_trl.models.coherent_reward import CoherentRewardModel
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


PROMPTS = [
    "What is 12 plus 7?",
    "Translate hello into French.",
    "List three fruits.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "Say something friendly.",
]
DEMOS = [
    "The answer is 19.",
    "bonjour",
    "apple, banana, cherry",
    "Explain why the sky is blue in one sentence.",
    "the sea is blue and the sea is deep",
    "Sure! Here is a friendly answer to your question.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    return CoherentRewardModel(tiny_causal_lm(tokenizer, "llama", seed=0), tiny_causal_lm(tokenizer, "llama", seed=1))


# ---------------------------------------------------------------------------------------------- statistics


def test_rank_auc_on_constructed_cases():
    assert rank_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert rank_auc([0, 1, 2], [3, 4, 5]) == 0.0
    # pairs (1,1): tie -> 0.5; (1,0), (2,1), (2,0): wins -> 3.5 / 4
    assert rank_auc([1, 2], [1, 0]) == pytest.approx(0.875)
    # 2 of the 6 pairs are wins: pos 2 beats neg 1; pos 0 beats nothing; pos 2 ties none.
    assert rank_auc([0, 2], [1, 3, 5]) == pytest.approx(1 / 6)
    assert rank_auc([5, 5], [5, 5, 5]) == 0.5
    assert np.isnan(rank_auc([], [1.0]))


def test_rank_auc_matches_sklearn_on_random_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, size=40), rng.integers(0, 4, size=25)  # many ties
    expected = metrics.roc_auc_score(np.r_[np.ones(40), np.zeros(25)], np.r_[pos, neg])
    assert rank_auc(pos, neg) == pytest.approx(expected)
    # The brute-force definition agrees too.
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert rank_auc(pos, neg) == pytest.approx(brute)


def test_correlations_on_constructed_cases():
    x = np.arange(1.0, 9.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone: rank correlation 1 ...
    assert pearson(x, x**3) < 0.99  # ... but not linear
    assert spearman(x, np.exp(-x)) == pytest.approx(-1.0)
    # A known value: x = 1..4, y = (1, 3, 2, 4) -> Spearman 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*2/60 = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert np.isnan(pearson([1, 2, 3], [5, 5, 5]))
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 10, size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_paired_win_rate():
    assert paired_win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)  # win, tie, loss


@pytest.mark.parametrize("n", [2, 3, 5, 17])
def test_shuffled_group_is_really_shuffled(n):
    responses = [f"response {i}" for i in range(n)]
    for seed in range(20):
        perm = derangement(n, seed)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == np.arange(n)).any()
        shuffled = shuffle_responses(responses, seed)
        assert sorted(shuffled) == sorted(responses)
        assert all(s != r for s, r in zip(shuffled, responses))  # no response stays with its prompt


# ------------------------------------------------------------------------------------------------- encoding


def test_encode_prompt_response_layout(tokenizer):
    prompts = ["Hi", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 7?"}]]
    responses = ["The answer is 19.", "bonjour"]
    batch = encode_prompt_response(tokenizer, prompts, responses)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape == att.shape == resp.shape and ids.dtype == torch.long

    def n_prompt_tokens(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_lens = [n_prompt_tokens([{"role": "user", "content": "Hi"}]), n_prompt_tokens(prompts[1])]
    width_p = max(prompt_lens)
    for row, response in enumerate(responses):
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        # left-padded prompt ending at column width_p, then the response, then right padding
        assert att[row, : width_p - prompt_lens[row]].sum() == 0
        assert att[row, width_p - prompt_lens[row] : width_p].all()
        assert resp[row, :width_p].sum() == 0
        got = ids[row, width_p : width_p + len(response_ids)].tolist()
        assert got == response_ids and got[-1] == tokenizer.eos_token_id
        assert resp[row].sum() == len(response_ids) == att[row, width_p:].sum()
        prompt_text = tokenizer.decode(ids[row, width_p - prompt_lens[row] : width_p])
        assert prompt_text.endswith("<|im_start|>assistant\n")

    # Token-id responses (e.g. sampled tokens) are used as they are: no EOS appended.
    as_ids = encode_prompt_response(tokenizer, prompts, [[5, 6, 7], [8]])
    assert as_ids["response_mask"].sum(-1).tolist() == [3, 1]
    assert as_ids["input_ids"][0, width_p : width_p + 3].tolist() == [5, 6, 7]

    short = encode_prompt_response(tokenizer, prompts, responses, max_length=6)
    assert short["attention_mask"].sum(-1).max() <= 6
    with pytest.raises(ValueError, match="responses"):
        encode_prompt_response(tokenizer, prompts, responses[:1])


def test_batched_scores_equal_one_at_a_time(tokenizer, reward_model):
    batched, lengths = score_responses(reward_model, tokenizer, PROMPTS, DEMOS, batch_size=4, show_progress=False)
    single = [
        score_responses(reward_model, tokenizer, [p], [d], show_progress=False)[0][0] for p, d in zip(PROMPTS, DEMOS)
    ]
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)
    expected_lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DEMOS]
    assert lengths.tolist() == expected_lengths


# --------------------------------------------------------------------------------------------- end to end


def _sft_on(tokenizer, base_seed: int = 1, steps: int = 60):
    """A tiny 'SFT' model: the base model trained on the demonstrations (response tokens only)."""
    model = tiny_causal_lm(tokenizer, "llama", seed=base_seed)
    batch = encode_prompt_response(tokenizer, PROMPTS, DEMOS)
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):  # 60 full-batch steps: enough for a 2-layer model to memorise 6 short answers
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_end_to_end_reward_separates_after_sft_and_writes_files(tokenizer, tmp_path):
    base = tiny_causal_lm(tokenizer, "llama", seed=1)
    reward_model = CoherentRewardModel(_sft_on(tokenizer), base)
    result = run_reward_diagnostics(
        reward_model, tokenizer, PROMPTS, DEMOS, tmp_path, max_new_tokens=8, batch_size=4, seed=0, show_progress=False
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["groups"]) == {"demonstration", "sft_sample", "base_sample", "shuffled"}
    assert all(g["reward"]["n"] == len(PROMPTS) for g in summary["groups"].values())
    # SFT memorised the demonstrations: every one scores above every sample of the base model ...
    assert summary["auc"]["demonstration_vs_base_sample"] == 1.0
    assert summary["paired_win_rate"]["demonstration_vs_base_sample"] == 1.0
    # ... and each demonstration scores higher under its own prompt than under the prompt it was shuffled to.
    same_response = summary["demonstration_vs_shuffled_same_response"]
    assert same_response["win_rate"] == 1.0 and same_response["mean_margin"] > 0
    own = np.asarray(result.scores["demonstration"]["reward"])[result.scores["shuffled"]["source_index"]]
    assert same_response["mean_margin"] == pytest.approx(float(np.mean(own - result.scores["shuffled"]["reward"])))
    # The summary's numbers are recomputable from the per-response scores.
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    by_group = {g: [s["reward"] for s in scores if s["group"] == g] for g in summary["groups"]}
    assert summary["auc"]["demonstration_vs_shuffled"] == pytest.approx(
        rank_auc(by_group["demonstration"], by_group["shuffled"])
    )
    assert summary["groups"]["demonstration"]["reward"]["mean"] == pytest.approx(np.mean(by_group["demonstration"]))
    # Samples are scored on their sampled tokens: at most max_new_tokens of them.
    assert max(result.scores["base_sample"]["length"] + result.scores["sft_sample"]["length"]) <= 8
    shuffled = [s["response"] for s in scores if s["group"] == "shuffled"]
    assert all(s != d for s, d in zip(shuffled, DEMOS))
    assert result.scores["demonstration"]["response"] == DEMOS
    assert (tmp_path / "reward_diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_on_saved_tiny_models(tokenizer, tmp_path):
    sft_dir, base_dir = tmp_path / "sft", tmp_path / "base"
    tiny_causal_lm(tokenizer, "gpt2", seed=0).save_pretrained(sft_dir)
    tiny_causal_lm(tokenizer, "gpt2", seed=1).save_pretrained(base_dir)
    tokenizer.save_pretrained(sft_dir)
    data = tmp_path / "demos.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": d}]}
        for p, d in zip(PROMPTS, DEMOS)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    summary = main(
        [
            "--sft_model",
            str(sft_dir),
            "--base_model",
            str(base_dir),
            "--data",
            str(data),
            "--output_dir",
            str(out),
            "--num_prompts",
            "4",
            "--max_new_tokens",
            "6",
            "--batch_size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert summary["groups"]["demonstration"]["reward"]["n"] == 4
    assert 0.0 <= summary["auc"]["demonstration_vs_shuffled"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["settings"]["num_prompts"] == 4
    assert (out / "reward_diagnostics.png").stat().st_size > 1000


def test_compute_diagnostics_rejects_bad_input(tokenizer, reward_model):
    with pytest.raises(ValueError, match="demonstrations"):
        compute_diagnostics(reward_model, tokenizer, PROMPTS, DEMOS[:2])
    with pytest.raises(ValueError, match="Unknown group"):
        compute_diagnostics(reward_model, tokenizer, PROMPTS, DEMOS, groups=["nonsense"])
    with pytest.raises(ValueError, match="at least 2"):
        compute_diagnostics(reward_model, tokenizer, PROMPTS[:1], DEMOS[:1], groups=["shuffled"])


# ------------------------------------------------------------------------------------------------- callback


def test_callback_logs_through_a_plain_trainer(tokenizer, reward_model, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    policy = tiny_causal_lm(tokenizer, "llama", seed=0)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": d}], tokenize=False
        )
        for p, d in zip(PROMPTS, DEMOS)
    ]
    enc = tokenizer(texts, padding="max_length", max_length=48, truncation=True)
    train = Dataset.from_dict({**enc, "labels": enc["input_ids"]})
    held_out = [{"prompt": p, "response": d} for p, d in zip(PROMPTS, DEMOS)]
    callback = RewardDiagnosticsCallback(
        reward_model, tokenizer, held_out, every_n_steps=1, num_prompts=4, max_new_tokens=6, batch_size=4
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )  # max_steps=2: enough to see the callback fire twice
    trainer = Trainer(model=policy, args=args, train_dataset=train)
    trainer.add_callback(callback.bind(trainer))
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "diagnostics/demonstration/reward_mean" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    for entry in logged:
        assert "diagnostics/policy_sample/reward_mean" in entry
        assert 0.0 <= entry["diagnostics/auc/demonstration_vs_shuffled"] <= 1.0
        assert 0.0 <= entry["diagnostics/same_response/win_rate"] <= 1.0
        assert "diagnostics/auc/policy_sample_vs_base_sample" in entry
    # The frozen groups are scored once and reused: identical numbers at both steps.
    assert logged[0]["diagnostics/demonstration/reward_mean"] == logged[1]["diagnostics/demonstration/reward_mean"]
    assert logged[0]["diagnostics/base_sample/reward_mean"] == logged[1]["diagnostics/base_sample/reward_mean"]

    # Without a trainer and without a model that can generate: history only, policy group skipped.
    lone = RewardDiagnosticsCallback(
        reward_model,
        tokenizer,
        (PROMPTS, DEMOS),
        groups=("demonstration", "shuffled", "policy_sample"),
        num_prompts=None,
        every_n_steps=0,
    )
    metrics = lone.compute(model=None)
    assert "diagnostics/auc/demonstration_vs_shuffled" in metrics
    assert not any(k.startswith("diagnostics/policy_sample") for k in metrics)
