"""The lm-eval wrapper, offline: metric-key parsing, and a full run of a local task against a tiny saved model."""

import json
from pathlib import Path

import pytest


pytest.importorskip("lm_eval")

from srppo_trl.evaluation.lm_eval_wrapper import (  # noqa: E402
    combine_results,
    expand_tasks,
    main,
    markdown_table,
    parse_task_metrics,
    pick_metric,
    summarize,
)


FIXTURE_TASKS = Path(__file__).parents[1] / "fixtures" / "lm_eval_task"

# The key layout lm-eval 0.4.x writes for IFEval, GSM8k and GPQA (values made up; only the layout matters).
LM_EVAL_LIKE_RESULTS = {
    "results": {
        "ifeval": {
            "alias": "ifeval",
            "prompt_level_strict_acc,none": 0.30,
            "prompt_level_strict_acc_stderr,none": 0.02,
            "inst_level_strict_acc,none": 0.41,
            "inst_level_strict_acc_stderr,none": "N/A",
            "prompt_level_loose_acc,none": 0.35,
            "inst_level_loose_acc,none": 0.476,
        },
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.01,
            "exact_match,flexible-extract": 0.31,
        },
        "gpqa_main_n_shot": {"alias": "gpqa_main_n_shot", "acc,none": 0.28, "acc_norm,none": 0.27},
        "gpqa_main_cot_n_shot": {
            "alias": "gpqa_main_cot_n_shot",
            "exact_match,strict-match": 0.0,
            "exact_match,flexible-extract": 0.22,
        },
        "my_task": {"alias": "my_task", "name": "my_task", "sample_len": 4, "bleu,none": 12.5},
    }
}


def test_parse_task_metrics_skips_stderr_alias_and_non_numbers():
    parsed = parse_task_metrics(LM_EVAL_LIKE_RESULTS["results"]["ifeval"])
    assert parsed == {
        "prompt_level_strict_acc": {"none": 0.30},
        "inst_level_strict_acc": {"none": 0.41},
        "prompt_level_loose_acc": {"none": 0.35},
        "inst_level_loose_acc": {"none": 0.476},
    }
    parsed = parse_task_metrics(LM_EVAL_LIKE_RESULTS["results"]["my_task"])
    assert parsed == {"bleu": {"none": 12.5}}  # "sample_len" and "name" are bookkeeping, not metrics


def test_pick_metric_prefers_filters_in_order_and_falls_back():
    metrics = parse_task_metrics(LM_EVAL_LIKE_RESULTS["results"]["gsm8k"])
    assert pick_metric(metrics, "exact_match", ("strict-match", "flexible-extract")) == (0.25, "strict-match")
    assert pick_metric(metrics, "exact_match", ("flexible-extract",)) == (0.31, "flexible-extract")
    assert pick_metric(metrics, "exact_match", ("no-such-filter",))[0] in {0.25, 0.31}
    assert pick_metric(metrics, "acc") == (None, None)


def test_summarize_maps_to_the_paper_columns():
    summary = summarize(LM_EVAL_LIKE_RESULTS)
    columns = summary["columns"]
    assert columns["IFEval L.Acc"] == pytest.approx(47.6)  # instruction level, loose, in percent
    assert columns["IFEval S.Acc"] == pytest.approx(41.0)
    assert columns["GSM8k EM"] == pytest.approx(25.0)  # strict-match, not flexible-extract
    assert columns["GPQA Acc"] == pytest.approx(28.0)  # the n_shot task, not the CoT one
    assert columns["GPQA CoT EM"] == pytest.approx(22.0)
    assert columns["my_task bleu"] == pytest.approx(12.5)  # unknown tasks keep lm-eval's raw value
    assert summary["sources"]["GSM8k EM"] == "gsm8k/exact_match,strict-match"
    assert summary["stderrs"]["ifeval"] == {"prompt_level_strict_acc": {"none": 0.02}}
    table = markdown_table({"sft": columns})
    assert table.splitlines()[0].startswith("| Model | IFEval L.Acc | IFEval S.Acc | GSM8k EM |")
    assert "| sft | 47.60 | 41.00 | 25.00 |" in table


def test_summarize_names_columns_by_task_when_a_pattern_matches_several():
    results = {"results": {"gpqa_main_n_shot": {"acc,none": 0.3}, "gpqa_diamond_n_shot": {"acc,none": 0.2}}}
    columns = summarize(results)["columns"]
    assert columns == {"GPQA Acc (gpqa_main_n_shot)": pytest.approx(30.0), "GPQA Acc (gpqa_diamond_n_shot)": 20.0}


def test_expand_tasks_presets_and_commas():
    assert expand_tasks(["paper"]) == ["ifeval", "gsm8k", "gpqa_main_n_shot", "gpqa_main_cot_n_shot"]
    assert expand_tasks(["gsm8k,ifeval", "gsm8k"]) == ["gsm8k", "ifeval"]
    with pytest.raises(ValueError):
        expand_tasks([" , "])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, "llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_runs_a_local_task_and_writes_json_and_markdown(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval"
    # limit 3 of the 4 fixture rows and no bootstrap keep the run to a few seconds on CPU.
    main(
        [
            "--model", str(tiny_model_dir),
            "--output_dir", str(out),
            "--tasks", "srppo_tiny_qa", "srppo_tiny_mc",
            "--include_path", str(FIXTURE_TASKS),
            "--limit", "3",
            "--batch_size", "2",
            "--device", "cpu",
            "--dtype", "float32",
            "--bootstrap_iters", "0",
            "--name", "tiny",
        ]
    )  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    raw = report["lm_eval"]["results"]
    assert set(raw) == {"srppo_tiny_qa", "srppo_tiny_mc"}
    assert report["lm_eval"]["n-samples"]["srppo_tiny_qa"]["effective"] == 3
    # The parsed metrics are lm-eval's own numbers, found under their "metric,filter" keys.
    columns = report["summary"]["columns"]
    assert columns["srppo_tiny_qa exact_match"] == raw["srppo_tiny_qa"]["exact_match,none"]
    assert columns["srppo_tiny_mc acc"] == raw["srppo_tiny_mc"]["acc,none"]
    assert 0.0 <= columns["srppo_tiny_mc acc"] <= 1.0
    # The tiny tokenizer has a chat template, so "auto" applied it.
    assert report["settings"]["apply_chat_template"] is True
    markdown = (out / "results.md").read_text()
    assert "| Model | srppo_tiny_qa exact_match | srppo_tiny_mc acc |" in markdown
    assert "not comparable" in markdown  # --limit was set
    assert f"| tiny | {columns['srppo_tiny_qa exact_match']:.2f} |" in markdown

    combined = combine_results([out / "results.json", out / "results.json"], tmp_path / "combined")
    assert combined.count("| tiny") == 2 and (tmp_path / "combined" / "results.md").exists()


def test_per_task_fewshot_and_unknown_task(tiny_model_dir, tmp_path, monkeypatch):
    from srppo_trl.evaluation.lm_eval_wrapper import evaluate_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="does not know"):
        evaluate_model(str(tiny_model_dir), tmp_path, ["srppo_tiny_qq"], include_path=FIXTURE_TASKS)
    report = evaluate_model(
        str(tiny_model_dir),
        tmp_path / "shots",
        ["srppo_tiny_qa", "srppo_tiny_mc"],
        include_path=FIXTURE_TASKS,
        num_fewshot={"srppo_tiny_qa": 1},  # one task gets a shot, the other keeps its YAML default (0)
        apply_chat_template=False,
        limit=2,
        batch_size=2,
        device="cpu",
        dtype="float32",
        bootstrap_iters=0,
    )
    assert report["lm_eval"]["n-shot"] == {"srppo_tiny_qa": 1, "srppo_tiny_mc": 0}
    assert report["settings"]["apply_chat_template"] is False
