"""The offline benchmark in one call: in-domain and held-out instruction following, plus arithmetic."""

from __future__ import annotations

from .arithmetic import build_arithmetic_problems, extract_answer, score_arithmetic
from .generation import generate_responses
from .instructions import build_instruction_prompts, check_response, score_instruction_responses


def evaluate_offline(
    model,
    tokenizer,
    n_per_split: int = 40,
    n_arithmetic: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    return_responses: bool = False,
    per_prompt: bool = False,
) -> dict:
    """Generate greedily on the offline benchmark and score it.

    Returns `{"in_domain": {...}, "held_out": {...}, "arithmetic": {...}, "summary": {flat metric name: value}}`
    (see `score_instruction_responses` and `score_arithmetic`); with `return_responses`, each split also holds its
    `examples` and `responses`; with `per_prompt`, each split holds `per_prompt` (see `per_prompt_scores`). The
    summary also has each split's `truncation_rate`: the share of responses cut at `max_new_tokens` before EOS. The
    prompts are the same for every model given the same `seed`.
    """
    splits = {
        "in_domain": build_instruction_prompts(n_per_split, seed=seed, split="in_domain"),
        "held_out": build_instruction_prompts(n_per_split, seed=seed + 1, split="held_out"),
        "arithmetic": build_arithmetic_problems(n_arithmetic or n_per_split, seed=seed, split="eval"),
    }
    results, summary = {}, {}
    for name, examples in splits.items():
        responses, stopped = generate_responses(
            model,
            tokenizer,
            [e["prompt"] for e in examples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc=f"eval {name}",
            return_stopped=True,
        )
        scores = (score_arithmetic if name == "arithmetic" else score_instruction_responses)(examples, responses)
        scores["mean_response_words"] = sum(len(r.split()) for r in responses) / len(responses)
        scores["truncation_rate"] = sum(not s for s in stopped) / len(stopped)
        if per_prompt:
            scores["per_prompt"] = per_prompt_scores(name, examples, responses, stopped)
        summary.update({f"{name}/{k}": v for k, v in scores.items() if isinstance(v, float)})
        if return_responses:
            scores.update(examples=examples, responses=responses)
        results[name] = scores
    results["summary"] = summary
    return results


def per_prompt_scores(split: str, examples, responses, stopped) -> dict[str, list[float]]:
    """One value per prompt and metric, in prompt order, for intervals that resample prompts.

    Instruction splits: `inst_strict_acc` / `inst_loose_acc` (the share of the prompt's instructions followed),
    `prompt_strict_acc` / `prompt_loose_acc` (1 if all are), `response_words`, `truncated`. Arithmetic:
    `exact_match`, `exact_match_loose`, `response_words`, `truncated`.
    """
    columns: dict[str, list[float]] = {}

    def add(name, value):
        columns.setdefault(name, []).append(float(value))

    for example, response, stop in zip(examples, responses, stopped):
        if split == "arithmetic":
            gold = str(example["answer"])
            add("exact_match", extract_answer(response, strict=True) == gold)
            add("exact_match_loose", extract_answer(response, strict=False) == gold)
        else:
            strict, loose = check_response(example, response)
            add("inst_strict_acc", sum(strict) / len(strict))
            add("inst_loose_acc", sum(loose) / len(loose))
            add("prompt_strict_acc", all(strict))
            add("prompt_loose_acc", all(loose))
        add("response_words", len(response.split()))
        add("truncated", not stop)
    return columns


def main(argv: list[str] | None = None) -> None:
    """`python -m srppo_trl.evaluation.offline --model DIR [--n 40] [--seed 0] [--output scores.json]`."""
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description="Score a saved model on the offline benchmark (CPU, no network).")
    parser.add_argument("--model", required=True, help="a local model folder (safetensors) with its tokenizer")
    parser.add_argument("--n", type=int, default=40, help="prompts per split (in-domain, held-out, arithmetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="write the full result as JSON here")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("The tokenizer must have a pad token distinct from EOS (e.g. <|endoftext|> for SmolLM2).")
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    result = evaluate_offline(
        model,
        tokenizer,
        n_per_split=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    for name, value in result["summary"].items():
        print(f"{name:40s} {value:.3f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
