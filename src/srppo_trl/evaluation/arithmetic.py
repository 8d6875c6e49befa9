"""Templated arithmetic word problems with GSM8k-style answers (`#### <number>`), scored by exact match.

A small stand-in for GSM8k that runs offline: the paper reports that SFT on narrow data hurts GSM8k and SRPPO recovers
it, so this task watches the same effect. Templates are grouped by split so that evaluation problems never share a
template with the problems in the shipped demonstrations ("sft") or PPO prompts ("ppo").

Scoring (`score_arithmetic`):
    exact_match        strict: the number after the last `####` equals the answer (GSM8k's "strict-match")
    exact_match_loose  the last number anywhere in the response equals the answer (GSM8k's "flexible-extract")
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


ANSWER_FORMAT = "Solve it step by step, then give the final answer on its own line as #### <number>."
"""Appended to every problem, so a model can follow the format zero-shot."""

NAMES = (
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kemi",
    "Leo",
    "Maya",
    "Noor",
)


@dataclass(frozen=True)
class Template:
    """A word problem: `question.format(name=..., **values)`; `answer(v)` an int; `steps(v)` the worked lines."""

    question: str
    ranges: dict[str, tuple[int, int]]
    answer: Callable[[dict], int]
    steps: Callable[[dict], list[str]]


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "sft": (
        Template(
            "{name} buys {a} packs of pencils with {b} pencils in each pack. How many pencils does {name} have?",
            {"a": (2, 9), "b": (3, 12)},
            lambda v: v["a"] * v["b"],
            lambda v: [
                f"Each pack has {v['b']} pencils and there are {v['a']} packs.",
                f"{v['a']} x {v['b']} = {v['a'] * v['b']}.",
            ],
        ),
        Template(
            "{name} has {a} stickers and gives away {b} of them. How many stickers are left?",
            {"a": (20, 90), "b": (2, 19)},
            lambda v: v["a"] - v["b"],
            lambda v: [
                f"Start with {v['a']} stickers and remove {v['b']}.",
                f"{v['a']} - {v['b']} = {v['a'] - v['b']}.",
            ],
        ),
        Template(
            "A box holds {a} apples. {name} adds {b} more and then eats {c}. How many apples are in the box now?",
            {"a": (10, 40), "b": (3, 20), "c": (1, 9)},
            lambda v: v["a"] + v["b"] - v["c"],
            lambda v: [
                f"After adding: {v['a']} + {v['b']} = {v['a'] + v['b']}.",
                f"After eating: {v['a'] + v['b']} - {v['c']} = {v['a'] + v['b'] - v['c']}.",
            ],
        ),
        Template(
            "{name} reads {a} pages every day for {b} days. How many pages does {name} read in total?",
            {"a": (5, 30), "b": (2, 7)},
            lambda v: v["a"] * v["b"],
            lambda v: [f"{v['a']} pages a day for {v['b']} days.", f"{v['a']} x {v['b']} = {v['a'] * v['b']}."],
        ),
    ),
    "ppo": (
        Template(
            "{name} shares {p} cookies equally among {a} friends. How many cookies does each friend get?",
            {"a": (2, 8), "b": (2, 9)},
            lambda v: v["b"],
            lambda v: [f"{v['a'] * v['b']} / {v['a']} = {v['b']}."],
        ),
        Template(
            "A bus has {a} passengers. At a stop {b} get off and {c} get on. How many passengers are on the bus?",
            {"a": (15, 50), "b": (1, 14), "c": (1, 12)},
            lambda v: v["a"] - v["b"] + v["c"],
            lambda v: [
                f"{v['a']} - {v['b']} = {v['a'] - v['b']}.",
                f"{v['a'] - v['b']} + {v['c']} = {v['a'] - v['b'] + v['c']}.",
            ],
        ),
        Template(
            "{name} saves {a} dollars a week for {b} weeks and then spends {c} dollars. How much money is left?",
            {"a": (5, 20), "b": (3, 8), "c": (1, 14)},
            lambda v: v["a"] * v["b"] - v["c"],
            lambda v: [
                f"Saved: {v['a']} x {v['b']} = {v['a'] * v['b']}.",
                f"Left: {v['a'] * v['b']} - {v['c']} = {v['a'] * v['b'] - v['c']}.",
            ],
        ),
    ),
    "eval": (
        Template(
            "{name} plants {a} rows of tulips with {b} tulips in each row, then {c} tulips wilt. "
            "How many tulips are still growing?",
            {"a": (3, 9), "b": (4, 12), "c": (1, 10)},
            lambda v: v["a"] * v["b"] - v["c"],
            lambda v: [
                f"Planted: {v['a']} x {v['b']} = {v['a'] * v['b']}.",
                f"Growing: {v['a'] * v['b']} - {v['c']} = {v['a'] * v['b'] - v['c']}.",
            ],
        ),
        Template(
            "A train travels {a} kilometres in the morning and {b} kilometres in the afternoon. "
            "How many kilometres does it travel that day?",
            {"a": (40, 250), "b": (30, 200)},
            lambda v: v["a"] + v["b"],
            lambda v: [f"{v['a']} + {v['b']} = {v['a'] + v['b']}."],
        ),
        Template(
            "{name} has {p} marbles and puts them into {a} equal bags. How many marbles go in each bag?",
            {"a": (2, 9), "b": (3, 15)},
            lambda v: v["b"],
            lambda v: [f"{v['a'] * v['b']} / {v['a']} = {v['b']}."],
        ),
        Template(
            "A shop sells {a} shirts on Monday, twice as many on Tuesday, and {b} on Wednesday. "
            "How many shirts does it sell over the three days?",
            {"a": (5, 30), "b": (4, 25)},
            lambda v: 3 * v["a"] + v["b"],
            lambda v: [
                f"Tuesday: 2 x {v['a']} = {2 * v['a']}.",
                f"Total: {v['a']} + {2 * v['a']} + {v['b']} = {3 * v['a'] + v['b']}.",
            ],
        ),
        Template(
            "{name} is {a} years old. {name}'s aunt is {b} years older. How old will the aunt be in {c} years?",
            {"a": (6, 30), "b": (15, 35), "c": (2, 10)},
            lambda v: v["a"] + v["b"] + v["c"],
            lambda v: [
                f"Aunt now: {v['a']} + {v['b']} = {v['a'] + v['b']}.",
                f"In {v['c']} years: {v['a'] + v['b']} + {v['c']} = {v['a'] + v['b'] + v['c']}.",
            ],
        ),
    ),
}


def _sample(template: Template, rng: random.Random) -> dict:
    values = {k: rng.randint(lo, hi) for k, (lo, hi) in template.ranges.items()}
    values["p"] = values.get("a", 1) * values.get("b", 1)  # a product, for the division templates
    values["name"] = rng.choice(NAMES)
    return values


def build_arithmetic_problems(n: int, seed: int = 0, split: str = "eval") -> list[dict]:
    """`n` problems from the templates of `split` ("eval", "sft" or "ppo"), deterministic in `seed`.

    Each row: `{"question", "prompt" (question + ANSWER_FORMAT), "answer" (int), "solution" (worked steps ending in
    "#### <answer>")}`. Distinct prompts while the templates allow it.
    """
    if split not in TEMPLATES:
        raise ValueError(f"split must be one of {sorted(TEMPLATES)}, got {split!r}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    rng = random.Random(seed)
    problems, seen = [], set()
    for _ in range(n * 50):
        if len(problems) == n:
            break
        template = rng.choice(TEMPLATES[split])
        values = _sample(template, rng)
        question = template.question.format(**values)
        if question in seen:
            continue
        seen.add(question)
        answer = template.answer(values)
        problems.append(
            {
                "question": question,
                "prompt": f"{question} {ANSWER_FORMAT}",
                "answer": answer,
                "solution": "\n".join([*template.steps(values), f"#### {answer}"]),
            }
        )
    if len(problems) < n:
        raise ValueError(f"The {split!r} templates give only {len(problems)} distinct problems; asked for {n}.")
    return problems


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(response: str, strict: bool = True) -> str | None:
    """The final number of a response: after the last `####` (strict) or the last number anywhere (loose).

    Thousands separators and a trailing `.0` are removed ("1,200.0" -> "1200"); None if there is no number.
    """
    if strict:
        matches = re.findall(r"####\s*\$?\s*(" + _NUMBER + ")", response)
    else:
        matches = re.findall(_NUMBER, response)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def score_arithmetic(problems: Sequence[dict], responses: Sequence[str]) -> dict:
    """`{"exact_match", "exact_match_loose", "format_rate", "num_problems"}`; format_rate = share with a `####` number."""
    if len(problems) != len(responses):
        raise ValueError(f"Got {len(problems)} problems but {len(responses)} responses; they must pair up.")
    if not problems:
        raise ValueError("Need at least one problem to score.")
    strict = [extract_answer(r, strict=True) for r in responses]
    loose = [extract_answer(r, strict=False) for r in responses]
    gold = [str(p["answer"]) for p in problems]
    n = len(problems)
    return {
        "exact_match": sum(s == g for s, g in zip(strict, gold)) / n,
        "exact_match_loose": sum(s == g for s, g in zip(loose, gold)) / n,
        "format_rate": sum(s is not None for s in strict) / n,
        "num_problems": n,
    }
