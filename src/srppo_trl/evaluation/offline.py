"""The offline benchmark in one call: in-domain and held-out instruction following, plus arithmetic."""

from __future__ import annotations

from .arithmetic import build_arithmetic_problems, score_arithmetic
from .generation import generate_responses
from .instructions import build_instruction_prompts, score_instruction_responses


def evaluate_offline(
    model,
    tokenizer,
    n_per_split: int = 40,
    n_arithmetic: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    return_responses: bool = False,
) -> dict:
    """Generate greedily on the offline benchmark and score it.

    Returns `{"in_domain": {...}, "held_out": {...}, "arithmetic": {...}, "summary": {flat metric name: value}}`
    (see `score_instruction_responses` and `score_arithmetic`); with `return_responses`, each split also holds its
    `examples` and `responses`. The prompts are the same for every model given the same `seed`.
    """
    splits = {
        "in_domain": build_instruction_prompts(n_per_split, seed=seed, split="in_domain"),
        "held_out": build_instruction_prompts(n_per_split, seed=seed + 1, split="held_out"),
        "arithmetic": build_arithmetic_problems(n_arithmetic or n_per_split, seed=seed, split="eval"),
    }
    results, summary = {}, {}
    for name, examples in splits.items():
        responses = generate_responses(
            model,
            tokenizer,
            [e["prompt"] for e in examples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc=f"eval {name}",
        )
        scores = (score_arithmetic if name == "arithmetic" else score_instruction_responses)(examples, responses)
        scores["mean_response_words"] = sum(len(r.split()) for r in responses) / len(responses)
        summary.update({f"{name}/{k}": v for k, v in scores.items() if isinstance(v, float)})
        if return_responses:
            scores.update(examples=examples, responses=responses)
        results[name] = scores
    results["summary"] = summary
    return results


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
