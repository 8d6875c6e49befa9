"""Reward diagnostics: does the coherent reward separate good responses from bad ones?

The paper's first sanity check for SRPPO (arXiv 2510.21090). For a set of prompts `x_i` with demonstrations `y_i`, we
score with the coherent reward `r~(x, y) = log p_SFT(y|x) - log p_PT(y|x)` (a `CoherentRewardModel`) four groups of
responses, one per prompt each:

| group | response to prompt `x_i` | what a working reward does |
|---|---|---|
| `demonstration` | `y_i` | high: SFT learned these |
| `sft_sample` | a sample of `p_SFT(.|x_i)` | high |
| `base_sample` | a sample of `p_PT(.|x_i)` | low: the reward is 0 in expectation only when p_SFT = p_PT |
| `shuffled` | `y_pi(i)`, another prompt's demonstration (`pi` a derangement) | low: fluent but off-topic |

plus, in the trainer callback, `policy_sample` (a sample of the policy being trained). Reported: each group's reward
distribution (mean, std, quantiles), the separation between groups as a rank AUC
`AUC(a, b) = P(r_a > r_b) + 0.5 P(r_a = r_b)` over all pairs (Mann-Whitney U / (n_a n_b)) and as a paired win rate
(same prompt), and Pearson / Spearman correlations of reward with response length in tokens (the length-bias failure
mode of the token-level reward, Appendix E). Outputs: a JSON summary, per-response scores and a PNG plot.

    python -m srppo_trl.evaluation.reward_diagnostics --sft_model SFT --base_model BASE --data demos.jsonl \
        --output_dir diagnostics/ [--num_prompts 64] [--max_new_tokens 128] [--batch_size 8]

`encode_prompt_response` is the shared way to turn (prompt, response) text into the `input_ids`, `attention_mask`,
`response_mask` tensors the reward model scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .generation import evaluation_generation_config, generate_in_batches, model_device


logger = logging.getLogger(__name__)

GROUPS = ("demonstration", "sft_sample", "base_sample", "shuffled")
"""The four groups of the paper's sanity check, in plotting order."""

SEPARATIONS = (
    ("demonstration", "shuffled"),
    ("demonstration", "base_sample"),
    ("sft_sample", "base_sample"),
    ("demonstration", "sft_sample"),
    ("policy_sample", "base_sample"),
    ("policy_sample", "shuffled"),
    ("policy_sample", "demonstration"),
)
"""Pairs `(a, b)` reported as `AUC(a, b)` and paired win rate when both groups were scored."""

PROMPT_FIELDS = ("prompt", "instruction", "question")
RESPONSE_FIELDS = ("response", "completion", "output", "answer", "chosen")


# ------------------------------------------------------------------------------------------------- encoding


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn; a list of `{role, content}` is kept."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) and "role" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(
        "Each prompt must be a string (the user turn) or a non-empty list of chat messages {role, content}."
    )


def _prompt_token_ids(tokenizer, prompts: Sequence) -> list[list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template: set `tokenizer.chat_template` (the SFT model's format).")
    from ..data.tokenization import tokenize_prompt

    # The same ids the trainer's rollouts start from (chat template, plus the BOS the tokenizer adds to text).
    return [tokenize_prompt(tokenizer, as_messages(prompt)) for prompt in prompts]


def encode_prompt_response(
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, response) pairs into the tensors a `CoherentRewardModel` scores.

    Each prompt (a string or chat messages) is rendered with the tokenizer's chat template and
    `add_generation_prompt=True`. A text response is tokenised without special tokens and EOS is appended (unless it
    already ends with EOS); a response given as a sequence of token ids (e.g. sampled tokens) is used as it is.
    Prompts are left-padded and responses right-padded, so every response starts at the same column `P` (the longest
    prompt)::

        [pad pad p p p | r r r EOS pad]
        [p p p p p     | r EOS pad pad]

    With `max_length`, a response is cut to `max_length - 1` tokens (losing its EOS if it was longer) and the prompt
    keeps its last tokens so that prompt + response fit in `max_length`.

    Returns `input_ids`, `attention_mask`, `response_mask` (1 on response tokens, EOS included), all long [B, P + R].
    """
    if len(prompts) != len(responses):
        raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses: pass one response per prompt.")
    if len(prompts) == 0:
        raise ValueError("No prompts given: pass at least one (prompt, response) pair.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: it is appended to every response and carries the reward.")
    eos = tokenizer.eos_token_id
    response_ids = []
    for response in responses:
        if isinstance(response, str):
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
        elif isinstance(response, (Sequence, torch.Tensor, np.ndarray)) and len(response) > 0:
            ids = [int(t) for t in response]
        else:
            raise ValueError("Each response must be a string or a non-empty sequence of token ids.")
        response_ids.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return pack_prompt_response(_prompt_token_ids(tokenizer, prompts), response_ids, pad, max_length)


def pack_prompt_response(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The token-level half of `encode_prompt_response`: left-pad prompts, right-pad responses, build the masks."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}.")
    prompt_ids, response_ids = [list(p) for p in prompt_ids], [list(r) for r in response_ids]
    if max_length is not None:
        response_ids = [ids[: max_length - 1] for ids in response_ids]
        prompt_ids = [p[len(p) - min(len(p), max_length - len(r)) :] for p, r in zip(prompt_ids, response_ids)]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("A prompt has zero tokens: every response needs at least one prompt token before it.")
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("A response has zero tokens: there is nothing to score.")
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(len(r) for r in response_ids)
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width_p + width_r), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[row, width_p - len(p) : width_p] = torch.tensor(p)
        input_ids[row, width_p : width_p + len(r)] = torch.tensor(r)
        attention_mask[row, width_p - len(p) : width_p + len(r)] = 1
        response_mask[row, width_p : width_p + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# --------------------------------------------------------------------------------------------- statistics


def rank_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """`P(a > b) + 0.5 P(a = b)` for `a` from `positive`, `b` from `negative` (the ROC AUC, ties counted half).

    Computed from average ranks (Mann-Whitney): `AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)` where
    `R_pos` is the sum of the positives' ranks in the pooled sample. O(n log n). NaN when a group is empty.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("rank_auc needs finite scores; got NaN or infinity.")
    ranks = average_ranks(np.concatenate([pos, neg]))
    r_pos = ranks[: pos.size].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as `scipy.stats.rankdata(method="average")`)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when fewer than 2 points or either variable is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"pearson needs two sequences of the same length, got {x.size} and {y.size}.")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties handled)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman needs two sequences of the same length, got {x.size} and {y.size}.")
    return pearson(average_ranks(x), average_ranks(y))


def paired_win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of prompts where `a[i] > b[i]` (ties count half): both groups scored on the same prompts."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"paired_win_rate needs one score per prompt in both groups, got {a.size} and {b.size}.")
    if a.size == 0:
        return float("nan")
    return float(((a > b) + 0.5 * (a == b)).mean())


def describe(values: Sequence[float]) -> dict[str, float]:
    """`n`, `mean`, `std` (population), `min`, `q05`, `q25`, `median`, `q75`, `q95`, `max`."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return {"n": 0}
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "q05": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q95": float(q[4]),
        "max": float(values.max()),
    }


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A uniformly random permutation of `range(n)` with no fixed point (`perm[i] != i` for all i), for n >= 2.

    Rejection sampling (a random permutation is a derangement with probability ~1/e). For n < 2 no derangement
    exists: the identity is returned.
    """
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def shuffle_responses(responses: Sequence[str], seed: int = 0) -> list[str]:
    """`responses` moved across prompts by a derangement: with n >= 2 no response stays at its own index."""
    return [responses[j] for j in derangement(len(responses), seed)]


# ------------------------------------------------------------------------------------------ scoring, sampling


@torch.no_grad()
def score_responses(
    reward_model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "scoring",
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sequence-level coherent rewards `r~(x_i, y_i)` and response lengths (tokens, EOS included), both [N].

    Responses are text or token ids (see `encode_prompt_response`). Pairs are batched by length (less padding);
    results are in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(prompts) != len(responses):
        raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses: pass one response per prompt.")
    sizes = [len(str(p)) + len(r) for p, r in zip(prompts, responses)]  # characters or tokens: only for batching
    order = sorted(range(len(prompts)), key=lambda i: -sizes[i])
    rewards = np.zeros(len(prompts))
    lengths = np.zeros(len(prompts), dtype=np.int64)
    device = model_device(reward_model.sft_model)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress):
        idx = order[start : start + batch_size]
        batch = encode_prompt_response(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = reward_model(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        rewards[idx] = scores.float().cpu().numpy()
        lengths[idx] = batch["response_mask"].sum(-1).cpu().numpy()
    return rewards, lengths


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "sampling",
    show_progress: bool = True,
) -> tuple[list[str], list[list[int]]]:
    """One sampled response per prompt (chat template, left padding): `(texts, token_ids)`.

    `token_ids[i]` are the sampled tokens up to and including the first EOS (all `max_new_tokens` of them when no EOS
    came); they are what gets scored, so no decode/re-encode round trip changes the response. `texts[i]` is their
    decoding without special tokens, for reading. Sampling is at `temperature` (1 by default, the reward's
    temperature; 0 means greedy). The global torch RNG is left untouched (`fork_rng`); `seed` makes the samples
    reproducible. The model's train/eval mode is restored.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = _prompt_token_ids(tokenizer, prompts)
    # Exactly softmax(logits / temperature) (top-p if asked), as in training: nothing from generation_config.json.
    config = evaluation_generation_config(max_new_tokens, pad, tokenizer.eos_token_id, temperature, top_p)
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        token_ids = generate_in_batches(model, prompt_ids, config, batch_size, desc=desc, show_progress=show_progress)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
    return texts, token_ids


# --------------------------------------------------------------------------------------------- diagnostics


@dataclass
class DiagnosticsResult:
    """Per-group scores (`{group: {"reward": [N], "length": [N], "response": [N]}}`, aligned with `prompts`; the
    `shuffled` group also has `source_index`) and the summary (see `summarize_scores`). Lengths are in tokens, EOS
    included; sampled responses are scored on their sampled tokens, text responses with EOS appended."""

    prompts: list
    scores: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def summarize_scores(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON summary.

    * `groups`: per group, reward and length statistics and the reward-length Pearson / Spearman correlations;
    * `auc`: `rank_auc(a, b)` for each pair `(a, b)` of `SEPARATIONS` present (unpaired: long responses can win on
      length alone, since the sequence reward is a sum over tokens);
    * `paired_win_rate`: same prompt, response of group `a` vs response of group `b`;
    * `demonstration_vs_shuffled_same_response`: each demonstration under its own prompt vs under the prompt it was
      shuffled to (`win_rate`, `mean_margin` in nats): the same tokens, so only the prompt conditioning differs;
    * `all_groups`: the reward-length correlations pooled over all groups.
    """
    groups = {}
    for name, group in scores.items():
        reward, length = np.asarray(group["reward"], float), np.asarray(group["length"], float)
        groups[name] = {
            "reward": describe(reward),
            "length": describe(length),
            "reward_length_pearson": pearson(reward, length),
            "reward_length_spearman": spearman(reward, length),
        }
    auc, win = {}, {}
    for a, b in SEPARATIONS:
        if a in scores and b in scores:
            auc[f"{a}_vs_{b}"] = rank_auc(scores[a]["reward"], scores[b]["reward"])
            if len(scores[a]["reward"]) == len(scores[b]["reward"]):
                win[f"{a}_vs_{b}"] = paired_win_rate(scores[a]["reward"], scores[b]["reward"])
    same_response = {}
    if "demonstration" in scores and "source_index" in scores.get("shuffled", {}):
        # The same response under its own prompt vs under another one: no length confound, only the prompt differs.
        own = np.asarray(scores["demonstration"]["reward"], float)[scores["shuffled"]["source_index"]]
        other = np.asarray(scores["shuffled"]["reward"], float)
        same_response = {"win_rate": paired_win_rate(own, other), "mean_margin": float((own - other).mean())}
    all_reward = np.concatenate([np.asarray(g["reward"], float) for g in scores.values()]) if scores else []
    all_length = np.concatenate([np.asarray(g["length"], float) for g in scores.values()]) if scores else []
    return {
        "groups": groups,
        "auc": auc,
        "paired_win_rate": win,
        "demonstration_vs_shuffled_same_response": same_response,
        "all_groups": {
            "reward_length_pearson": pearson(all_reward, all_length),
            "reward_length_spearman": spearman(all_reward, all_length),
        },
    }


def compute_diagnostics(
    reward_model,
    tokenizer,
    prompts: Sequence,
    demonstrations: Sequence[str],
    *,
    groups: Sequence[str] = GROUPS,
    policy_model=None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    precomputed: Mapping[str, Mapping[str, Any]] | None = None,
) -> DiagnosticsResult:
    """Score the requested groups (`GROUPS` plus, with `policy_model`, `"policy_sample"`) and summarise them.

    `sft_sample` and `base_sample` are drawn from the reward model's own `p_SFT` and `p_PT` (in single-base mode, the
    PEFT model with the SFT adapter active, then with adapters disabled). `shuffled` pairs prompt `i` with the
    demonstration of prompt `pi(i)` for a random derangement `pi` (`seed`). Groups in `precomputed` are reused as they
    are (the trainer callback caches the groups that cannot change during training).
    """
    if len(prompts) != len(demonstrations):
        raise ValueError(f"Got {len(prompts)} prompts but {len(demonstrations)} demonstrations: one per prompt.")
    if len(prompts) < 2 and "shuffled" in groups:
        raise ValueError("The shuffled group needs at least 2 prompts (a response must move to another prompt).")
    known = set(GROUPS) | {"policy_sample"}
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(f"Unknown group(s) {unknown}: choose from {sorted(known)}.")
    if "policy_sample" in groups and policy_model is None:
        raise ValueError("The policy_sample group needs `policy_model` (the model being trained).")
    prompts, demonstrations = list(prompts), list(demonstrations)
    sample_args = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
    )
    scores: dict[str, dict[str, Any]] = {}
    for group in groups:
        if precomputed and group in precomputed:
            scores[group] = dict(precomputed[group])
            continue
        to_score = None  # token ids of sampled responses, scored as they were sampled
        if group == "demonstration":
            responses = demonstrations
        elif group == "shuffled":
            source_index = derangement(len(demonstrations), seed).tolist()
            responses = [demonstrations[j] for j in source_index]
        elif group == "sft_sample":
            with reward_model.sft_context() as model:
                responses, to_score = sample_responses(model, tokenizer, prompts, desc="sampling p_SFT", **sample_args)
        elif group == "base_sample":
            with reward_model.base_context() as model:
                responses, to_score = sample_responses(model, tokenizer, prompts, desc="sampling p_PT", **sample_args)
        else:  # policy_sample
            responses, to_score = sample_responses(
                policy_model, tokenizer, prompts, desc="sampling policy", **sample_args
            )
        if to_score is not None and any(len(ids) == 0 for ids in to_score):
            raise ValueError(f"A {group} response has no token: use max_new_tokens >= 1.")
        reward, length = score_responses(
            reward_model,
            tokenizer,
            prompts,
            responses if to_score is None else to_score,
            batch_size,
            max_length,
            f"scoring {group}",
            show_progress,
        )
        scores[group] = {"reward": reward.tolist(), "length": length.tolist(), "response": list(responses)}
        if group == "shuffled":
            scores[group]["source_index"] = source_index  # shuffled[i] = (prompt i, demonstration source_index[i])
    return DiagnosticsResult(prompts=prompts, scores=scores, summary=summarize_scores(scores))


def flatten_summary(summary: Mapping[str, Any], prefix: str = "diagnostics") -> dict[str, float]:
    """The summary as flat scalar metrics for a trainer log, e.g.

    `diagnostics/demonstration/reward_mean`, `.../reward_std`, `.../reward_median`, `.../length_mean`,
    `.../reward_length_spearman`, `diagnostics/auc/demonstration_vs_shuffled`,
    `diagnostics/paired_win_rate/demonstration_vs_shuffled`, `diagnostics/same_response/win_rate`,
    `diagnostics/same_response/mean_margin`, `diagnostics/all/reward_length_spearman`.
    NaN values are left out (the trainer's log would print them, reporters may reject them).
    """
    flat: dict[str, float] = {}
    for name, group in summary["groups"].items():
        for stat in ("mean", "std", "median", "q05", "q95"):
            if stat in group["reward"]:
                flat[f"{prefix}/{name}/reward_{stat}"] = group["reward"][stat]
        if "mean" in group["length"]:
            flat[f"{prefix}/{name}/length_mean"] = group["length"]["mean"]
        flat[f"{prefix}/{name}/reward_length_pearson"] = group["reward_length_pearson"]
        flat[f"{prefix}/{name}/reward_length_spearman"] = group["reward_length_spearman"]
    for kind in ("auc", "paired_win_rate"):
        for pair, value in summary[kind].items():
            flat[f"{prefix}/{kind}/{pair}"] = value
    for key, value in summary.get("demonstration_vs_shuffled_same_response", {}).items():
        flat[f"{prefix}/same_response/{key}"] = value
    for key, value in summary["all_groups"].items():
        flat[f"{prefix}/all/{key}"] = value
    return {k: float(v) for k, v in flat.items() if v is not None and not math.isnan(v)}


# ---------------------------------------------------------------------------------------------------- output


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def plot_diagnostics(result: DiagnosticsResult, path: str | Path) -> Path:
    """A PNG with three panels: reward histograms per group, a box plot per group, reward vs response length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result.scores)
    rewards = [np.asarray(result.scores[g]["reward"], float) for g in names]
    fig = Figure(figsize=(16, 4.8))
    FigureCanvasAgg(fig)
    ax_hist, ax_box, ax_scatter = fig.subplots(1, 3)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    finite = np.concatenate(rewards) if rewards else np.zeros(1)
    bins = np.linspace(finite.min(), finite.max() if finite.max() > finite.min() else finite.min() + 1, 21)
    for name, reward in zip(names, rewards):
        ax_hist.hist(reward, bins=bins, histtype="step", linewidth=1.8, color=colors[name], label=name)
    ax_hist.set_xlabel("coherent reward  log p_SFT(y|x) - log p_PT(y|x)")
    ax_hist.set_ylabel("responses")
    ax_hist.legend(fontsize=8)
    ax_hist.set_title("reward per group")
    ax_box.boxplot(rewards, showmeans=True)
    ax_box.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(r)})" for n, r in zip(names, rewards)], fontsize=8)
    ax_box.set_ylabel("coherent reward")
    auc = result.summary.get("auc", {})
    title = ", ".join(f"AUC {k.replace('_vs_', ' > ')} = {v:.2f}" for k, v in list(auc.items())[:2] if v == v)
    ax_box.set_title(title or "reward per group", fontsize=9)
    for name in names:
        group = result.scores[name]
        ax_scatter.scatter(group["length"], group["reward"], s=14, alpha=0.7, color=colors[name], label=name)
    spearman_all = result.summary.get("all_groups", {}).get("reward_length_spearman")
    ax_scatter.set_title(
        "reward vs length"
        + ("" if spearman_all is None or spearman_all != spearman_all else f" (Spearman {spearman_all:.2f})")
    )
    ax_scatter.set_xlabel("response length (tokens, EOS included)")
    ax_scatter.set_ylabel("coherent reward")
    ax_scatter.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_diagnostics(result: DiagnosticsResult, output_dir: str | Path, settings: Mapping | None = None) -> dict:
    """Write `summary.json`, `scores.jsonl` (one line per scored response) and `reward_diagnostics.png`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"settings": dict(settings or {}), **result.summary}
    (output_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
    with open(output_dir / "scores.jsonl", "w") as f:
        for group, values in result.scores.items():
            for i, (reward, length, response) in enumerate(
                zip(values["reward"], values["length"], values["response"])
            ):
                line = {"group": group, "prompt_index": i, "reward": reward, "length": length, "response": response}
                f.write(json.dumps(_json_safe(line)) + "\n")
    plot = plot_diagnostics(result, output_dir / "reward_diagnostics.png")
    return {"summary": output_dir / "summary.json", "scores": output_dir / "scores.jsonl", "plot": plot}


def run_reward_diagnostics(
    reward_model,
    tokenizer,
    prompts: Sequence,
    demonstrations: Sequence[str],
    output_dir: str | Path,
    **kwargs,
) -> DiagnosticsResult:
    """`compute_diagnostics` (same keyword arguments), then `write_diagnostics` into `output_dir`."""
    result = compute_diagnostics(reward_model, tokenizer, prompts, demonstrations, **kwargs)
    settings = {k: v for k, v in kwargs.items() if k not in {"policy_model", "precomputed"}}
    write_diagnostics(result, output_dir, {"num_prompts": len(result.prompts), **settings})
    return result


# ------------------------------------------------------------------------------------------------------- data


def _response_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], Mapping) and "content" in value[-1]:
        return str(value[-1]["content"])  # conversational completion: the last (assistant) message
    raise ValueError("A response must be a string or a list of chat messages ending with the assistant's answer.")


def prompts_and_responses(rows, prompt_field: str | None = None, response_field: str | None = None):
    """(prompts, demonstrations) from rows (a `datasets.Dataset` or a list of dicts).

    Accepted layouts: `messages` (chat; the last message is the assistant's demonstration, the earlier ones the
    prompt), or a prompt field (`prompt`, `instruction`, `question`; text or chat messages) with a response field
    (`response`, `completion`, `output`, `answer`, `chosen`; text or chat messages). Pass the field names to override.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("The dataset is empty: diagnostics need prompts with demonstrations.")
    first = rows[0]
    prompts, responses = [], []
    if prompt_field is None and response_field is None and "messages" in first:
        for row in rows:
            messages = row["messages"]
            if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
                raise ValueError("Each `messages` row must end with an assistant message that follows the prompt.")
            prompts.append([dict(m) for m in messages[:-1]])
            responses.append(str(messages[-1]["content"]))
        return prompts, responses
    prompt_field = prompt_field or next((f for f in PROMPT_FIELDS if f in first), None)
    response_field = response_field or next((f for f in RESPONSE_FIELDS if f in first), None)
    if prompt_field is None or response_field is None or prompt_field not in first or response_field not in first:
        raise ValueError(
            f"Could not find prompt/response columns in {sorted(first)}: use `messages`, or one of {PROMPT_FIELDS} "
            f"with one of {RESPONSE_FIELDS}, or pass prompt_field/response_field."
        )
    for row in rows:
        prompt = row[prompt_field]
        prompts.append(prompt if isinstance(prompt, str) else as_messages(prompt))
        responses.append(_response_text(row[response_field]))
    return prompts, responses


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a `.jsonl` file or a `.json` file holding a list of objects."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"No such data file: {path}.")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of objects (or use a .jsonl file).")
    return data


def _subsample(prompts, responses, num_prompts: int | None, seed: int):
    if num_prompts is None or num_prompts >= len(prompts):
        return list(prompts), list(responses)
    keep = sorted(np.random.default_rng(seed).choice(len(prompts), size=num_prompts, replace=False).tolist())
    return [prompts[i] for i in keep], [responses[i] for i in keep]


# ---------------------------------------------------------------------------------------------------- callback


def _policy_of(model):
    """The generating LM inside a trainer's model (SRPPO wraps policy and critic in one module)."""
    model = getattr(model, "policy", model)
    return model if hasattr(model, "generate") else None


class RewardDiagnosticsCallback(TrainerCallback):
    """Logs the reward diagnostics on a held-out set every `every_n_steps` steps and after each evaluation.

    Works with any `transformers.Trainer`. The frozen groups (`demonstration`, `shuffled`, `sft_sample`,
    `base_sample`: the reward model does not change) are scored once and cached; `policy_sample` is re-sampled from
    the trainer's model at each call (with a fixed seed, so runs differ only by the policy). Metrics are named as in
    `flatten_summary` (`diagnostics/policy_sample/reward_mean`, `diagnostics/auc/policy_sample_vs_base_sample`, ...).

    Logging goes through `trainer.log` (so every report_to integration sees it) when the callback knows the
    trainer - pass `trainer=` or call `bind(trainer)`, e.g. `trainer.add_callback(callback.bind(trainer))`.
    Otherwise the metrics are appended to `state.log_history` only. Computed on the main process only.

    Args:
        reward_model: the `CoherentRewardModel`.
        tokenizer: the tokenizer shared by the policy and the reward (with its chat template).
        dataset: held-out rows in a layout `prompts_and_responses` accepts, or a `(prompts, demonstrations)` pair.
        every_n_steps: 0 disables the step trigger.
        log_on_evaluate: also compute after each `trainer.evaluate()` (skipped when this step was already logged).
        groups: which groups to score; `policy_sample` is skipped (with a warning) if the model cannot generate.
        num_prompts, seed: a fixed random subset of the held-out set; the seed also drives sampling and shuffling.
    """

    def __init__(
        self,
        reward_model,
        tokenizer,
        dataset,
        *,
        trainer=None,
        every_n_steps: int = 100,
        log_on_evaluate: bool = True,
        groups: Sequence[str] = ("demonstration", "shuffled", "sft_sample", "base_sample", "policy_sample"),
        num_prompts: int | None = 64,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        batch_size: int = 8,
        max_length: int | None = None,
        seed: int = 0,
        prefix: str = "diagnostics",
        prompt_field: str | None = None,
        response_field: str | None = None,
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 disables it), got {every_n_steps}.")
        if isinstance(dataset, tuple) and len(dataset) == 2:
            prompts, responses = list(dataset[0]), list(dataset[1])
        else:
            prompts, responses = prompts_and_responses(dataset, prompt_field, response_field)
        self.prompts, self.demonstrations = _subsample(prompts, responses, num_prompts, seed)
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.log_on_evaluate = log_on_evaluate
        self.groups = tuple(groups)
        self.prefix = prefix
        self.options = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            show_progress=False,
        )
        self._frozen: dict[str, dict[str, Any]] = {}
        self._last_step: int | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._warned = False

    def bind(self, trainer):
        """Log through `trainer.log` from now on; returns the callback (for `trainer.add_callback(cb.bind(t))`)."""
        self.trainer = trainer
        return self

    def compute(self, model=None) -> dict[str, float]:
        """Score the groups now (the frozen ones from cache) and return the flat metrics."""
        groups = list(self.groups)
        policy = _policy_of(model) if model is not None else None
        if "policy_sample" in groups and policy is None:
            groups.remove("policy_sample")
            if not self._warned:
                logger.warning("RewardDiagnosticsCallback: no model that can generate; skipping policy_sample.")
                self._warned = True
        result = compute_diagnostics(
            self.reward_model,
            self.tokenizer,
            self.prompts,
            self.demonstrations,
            groups=groups,
            policy_model=policy,
            precomputed=self._frozen,
            **self.options,
        )
        for group in groups:
            if group != "policy_sample":
                self._frozen[group] = result.scores[group]
        return flatten_summary(result.summary, self.prefix)

    def _compute_and_log(self, state, model) -> None:
        if not state.is_world_process_zero or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        metrics = self.compute(model)
        self.history.append((state.global_step, metrics))
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._compute_and_log(state, model)
        return control

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.log_on_evaluate:
            self._compute_and_log(state, model)
        return control


# --------------------------------------------------------------------------------------------------------- CLI


def _load_reward_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srppo_trl.models.coherent_reward import CoherentRewardModel

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = dict(dtype=dtype, trust_remote_code=False)
    if args.sft_adapter:
        from peft import PeftModel

        if not args.base_model:
            raise ValueError("--sft_adapter needs --base_model (the pretrained model the adapter was trained on).")
        base = AutoModelForCausalLM.from_pretrained(args.base_model, **load).to(device)
        sft = PeftModel.from_pretrained(base, args.sft_adapter)
        reward_model = CoherentRewardModel(sft)
        tokenizer_path = args.tokenizer or args.sft_adapter
    else:
        if not (args.sft_model and args.base_model):
            raise ValueError("Pass --sft_model and --base_model (or --base_model with --sft_adapter).")
        sft = AutoModelForCausalLM.from_pretrained(args.sft_model, **load).to(device)
        base = AutoModelForCausalLM.from_pretrained(args.base_model, **load).to(device)
        reward_model = CoherentRewardModel(sft, base)
        tokenizer_path = args.tokenizer or args.sft_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return reward_model, tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m srppo_trl.evaluation.reward_diagnostics",
        description="Does the coherent reward log p_SFT - log p_PT separate demonstrations from bad responses?",
    )
    parser.add_argument("--sft_model", help="the SFT model directory")
    parser.add_argument("--base_model", help="the pretrained model directory (p_PT)")
    parser.add_argument("--sft_adapter", help="a PEFT SFT adapter on --base_model (single-base mode)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the SFT model's or adapter's)")
    parser.add_argument("--data", required=True, help=".jsonl/.json rows: messages, or prompt + response columns")
    parser.add_argument("--prompt_field", default=None)
    parser.add_argument("--response_field", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--num_prompts", type=int, default=None, help="a random subset of this size (seeded)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None, help="truncate prompt + response to this many tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    prompts, demonstrations = prompts_and_responses(load_rows(args.data), args.prompt_field, args.response_field)
    prompts, demonstrations = _subsample(prompts, demonstrations, args.num_prompts, args.seed)
    reward_model, tokenizer = _load_reward_model(args)
    result = run_reward_diagnostics(
        reward_model,
        tokenizer,
        prompts,
        demonstrations,
        args.output_dir,
        groups=args.groups,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )
    summary = result.summary
    for name, group in summary["groups"].items():
        r = group["reward"]
        print(f"{name:>14}: reward mean {r['mean']:+.3f} std {r['std']:.3f} | length-Spearman "
              f"{group['reward_length_spearman']:+.3f}")  # fmt: skip
    for pair, value in summary["auc"].items():
        print(f"AUC {pair}: {value:.3f}")
    print(f"wrote {Path(args.output_dir) / 'summary.json'} and reward_diagnostics.png")
    return summary


if __name__ == "__main__":
    main()
