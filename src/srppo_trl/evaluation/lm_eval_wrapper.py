"""The paper's benchmarks through lm-evaluation-harness: one command per saved model, results as JSON + Markdown.

SRPPO (arXiv 2510.21090, Sec. 4) evaluates with lm-evaluation-harness "in its default settings":

| column | lm-eval task | metric (filter) | shots |
|---|---|---|---|
| IFEval L.Acc / S.Acc | `ifeval` | `inst_level_loose_acc` / `inst_level_strict_acc` (instruction level) | 0 |
| GSM8k EM | `gsm8k` | `exact_match` (`strict-match`, i.e. the `#### answer` line) | 5 |
| GPQA Acc (few-shot) | `gpqa_main_n_shot` | `acc` (log-likelihood of the choice letter) | 5 |
| GPQA CoT EM (few-shot CoT) | `gpqa_main_cot_n_shot` | `exact_match` (`flexible-extract`) | 5 |
| GPQA Direct EM (optional) | `gpqa_main_generative_n_shot` | `exact_match` (`flexible-extract`) | 5 |

We do not re-implement any of it: this module picks the tasks and their shot counts, calls `lm_eval.simple_evaluate`
with the Hugging Face backend (chat template applied when the tokenizer has one, few-shot examples as a multi-turn
chat), and maps lm-eval's metric keys (`"inst_level_loose_acc,none"`, `"exact_match,strict-match"`, ...) to the
paper's columns. AlpacaEval 2 needs an API judge and is documented in `docs/benchmarks_paper.md`, not run here.

    python -m srppo_trl.evaluation.lm_eval_wrapper --model PATH --output_dir DIR \
        [--tasks paper | TASK ...] [--limit N] [--batch_size auto] [--device cuda] [--include_path DIR]

writes `DIR/results.json` (summary, every parsed metric, lm-eval's raw output) and `DIR/results.md` (the table).
`--combine a/results.json b/results.json --output_dir DIR` builds one table with a row per model.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


PAPER_TASKS = ("ifeval", "gsm8k", "gpqa_main_n_shot", "gpqa_main_cot_n_shot")
"""The lm-eval tasks behind the paper's IFEval, GSM8k, GPQA few-shot and GPQA few-shot CoT columns."""

TASK_PRESETS = {
    "paper": PAPER_TASKS,
    "gpqa": ("gpqa_main_n_shot", "gpqa_main_cot_n_shot"),
    "gpqa_direct": ("gpqa_main_generative_n_shot",),
}
"""Names `--tasks` accepts besides lm-eval task names."""

DEFAULT_NUM_FEWSHOT = {
    r"gsm8k": 5,
    r"gpqa_(main|diamond|extended)_(n_shot|cot_n_shot|generative_n_shot)": 5,
}
"""Shots per task (regex on the task name). lm-eval's `gsm8k` already defaults to 5; its GPQA `*_n_shot` tasks set
none (lm-eval then uses 0), so we set the 5 shots that the few-shot setting needs. IFEval is zero-shot."""


@dataclass(frozen=True)
class Column:
    """One column of the paper's table: a metric of the tasks whose name matches `task_regex`."""

    header: str
    task_regex: str
    metric: str
    filters: tuple[str, ...] = ("none",)  # preferred lm-eval filters, first found wins
    percent: bool = True  # lm-eval reports fractions; the paper prints percentages


PAPER_COLUMNS = (
    Column("IFEval L.Acc", r"ifeval", "inst_level_loose_acc"),
    Column("IFEval S.Acc", r"ifeval", "inst_level_strict_acc"),
    Column("GSM8k EM", r"gsm8k", "exact_match", ("strict-match", "flexible-extract", "none")),
    Column("GPQA Acc", r"gpqa_(main|diamond|extended)_n_shot", "acc"),
    Column(
        "GPQA Direct EM",
        r"gpqa_(main|diamond|extended)_generative_n_shot",
        "exact_match",
        ("flexible-extract", "strict-match"),
    ),
    Column(
        "GPQA CoT EM", r"gpqa_(main|diamond|extended)_cot_n_shot", "exact_match", ("flexible-extract", "strict-match")
    ),
)


# ----------------------------------------------------------------------------------------------- metric parsing


def parse_task_metrics(task_results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task result dict -> `{metric: {filter: value}}`, numbers only.

    lm-eval keys look like `"prompt_level_strict_acc,none"` or `"exact_match,strict-match"` (metric, then filter);
    `"..._stderr,<filter>"` keys, `"alias"`, `"name"`, `"sample_len"` and non-numeric values (`"N/A"`) are skipped.
    A key without a comma is read as the metric with filter `"none"` only if it is numeric and not bookkeeping.
    """
    parsed: dict[str, dict[str, float]] = {}
    for key, value in task_results.items():
        if key in {"alias", "name", "sample_len", "samples"} or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        if metric.endswith("_stderr"):
            continue
        parsed.setdefault(metric.strip(), {})[filter_name.strip() or "none"] = float(value)
    return parsed


def parse_task_stderrs(task_results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Like `parse_task_metrics` but for the `"<metric>_stderr,<filter>"` entries (numeric ones only)."""
    parsed: dict[str, dict[str, float]] = {}
    for key, value in task_results.items():
        metric, _, filter_name = key.partition(",")
        if metric.endswith("_stderr") and isinstance(value, (int, float)) and not isinstance(value, bool):
            parsed.setdefault(metric[: -len("_stderr")], {})[filter_name or "none"] = float(value)
    return parsed


def pick_metric(metrics: Mapping[str, Mapping[str, float]], metric: str, filters: Sequence[str] = ("none",)):
    """The value of `metric` under the first of `filters` that lm-eval reported (any filter as a last resort).

    Returns `(value, filter)` or `(None, None)` when the metric is absent.
    """
    by_filter = metrics.get(metric)
    if not by_filter:
        return None, None
    for filter_name in filters:
        if filter_name in by_filter:
            return by_filter[filter_name], filter_name
    filter_name = sorted(by_filter)[0]
    return by_filter[filter_name], filter_name


def summarize(results: Mapping[str, Any], columns: Sequence[Column] = PAPER_COLUMNS) -> dict[str, Any]:
    """Map lm-eval's `results["results"]` onto the paper's columns.

    Returns `{"columns": {header: value}, "sources": {header: "task/metric,filter"}, "metrics": {task: {metric:
    {filter: value}}}, "stderrs": {...}}`. Values of `percent` columns are multiplied by 100. A task matching no column
    gets one column per metric, headed `"<task> <metric>[ (<filter>)]"`, with lm-eval's raw value. When one column
    pattern matches several tasks (e.g. GPQA main and diamond), the task name is appended to the header.
    """
    per_task = results.get("results", results)
    metrics = {task: parse_task_metrics(values) for task, values in per_task.items()}
    stderrs = {task: parse_task_stderrs(values) for task, values in per_task.items()}
    out_columns: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    matched: set[str] = set()
    for column in columns:
        tasks = [task for task in metrics if re.fullmatch(column.task_regex, task)]
        for task in tasks:
            value, filter_name = pick_metric(metrics[task], column.metric, column.filters)
            if value is None:
                continue
            matched.add(task)
            header = column.header if len(tasks) == 1 else f"{column.header} ({task})"
            out_columns[header] = 100.0 * value if column.percent else value
            sources[header] = f"{task}/{column.metric},{filter_name}"
    for task, task_metrics in metrics.items():
        if task in matched:
            continue
        for metric, by_filter in task_metrics.items():
            for filter_name, value in by_filter.items():
                header = f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")
                out_columns[header] = value
                sources[header] = f"{task}/{metric},{filter_name}"
    return {"columns": out_columns, "sources": sources, "metrics": metrics, "stderrs": stderrs}


def markdown_table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """`{row name: {header: value}}` -> a Markdown table, one row per model, columns in first-seen order."""
    headers: list[str] = []
    for values in rows.values():
        headers += [h for h in values if h not in headers]
    lines = ["| Model | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for name, values in rows.items():
        cells = ["-" if values.get(h) is None else f"{values[h]:.2f}" for h in headers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metrics_table(summary: Mapping[str, Any]) -> str:
    lines = ["| task | metric | filter | value | stderr |", "|---|---|---|---:|---:|"]
    for task, task_metrics in summary["metrics"].items():
        for metric, by_filter in task_metrics.items():
            for filter_name, value in by_filter.items():
                stderr = summary["stderrs"].get(task, {}).get(metric, {}).get(filter_name)
                stderr_cell = "-" if stderr is None else f"{stderr:.4f}"
                lines.append(f"| {task} | {metric} | {filter_name} | {value:.4f} | {stderr_cell} |")
    return "\n".join(lines) + "\n"


def render_markdown(name: str, summary: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The `results.md` of one model: the paper-layout table, then every metric lm-eval reported."""
    parts = [f"# lm-eval results: {name}\n"]
    if settings.get("limit") is not None:
        parts.append(
            f"**`limit={settings['limit']}`: only part of each benchmark was run; these numbers are not comparable "
            "to the paper's.**\n"
        )
    parts.append("Percentages (0-100) for the paper's columns, lm-eval's raw values otherwise.\n")
    parts.append(markdown_table({name: summary["columns"]}))
    parts.append("\n## Every metric\n")
    parts.append(_metrics_table(summary))
    parts.append("\n## Settings\n")
    parts.append("```json\n" + json.dumps(settings, indent=2, default=str) + "\n```\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------- evaluation


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Expand presets (`paper`, `gpqa`, `gpqa_direct`) and comma-separated lists; keep order, drop duplicates."""
    names: list[str] = []
    for item in tasks:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            for task in TASK_PRESETS.get(name, (name,)):
                if task not in names:
                    names.append(task)
    if not names:
        raise ValueError("No task given: pass lm-eval task names or the preset 'paper'.")
    return names


def _fewshot_for(task: str, num_fewshot: int | Mapping[str, int] | None) -> int | None:
    if isinstance(num_fewshot, int):
        return num_fewshot
    table = dict(DEFAULT_NUM_FEWSHOT)
    if num_fewshot is not None:
        table.update(num_fewshot)
    for pattern, shots in table.items():
        if re.fullmatch(pattern, task):
            return shots
    return None


def _resolve_chat_template(apply_chat_template: bool | str, tokenizer_path: str) -> bool:
    if isinstance(apply_chat_template, bool):
        return apply_chat_template
    value = str(apply_chat_template).lower()
    if value in {"true", "yes", "1"}:
        return True
    if value in {"false", "no", "0"}:
        return False
    if value != "auto":
        raise ValueError(f"apply_chat_template must be 'auto', True or False, got {apply_chat_template!r}.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return bool(getattr(tokenizer, "chat_template", None))


@functools.lru_cache(maxsize=4)
def task_manager_for(include_path: str | None = None):
    """An lm-eval `TaskManager` over the built-in tasks plus `include_path`, cached (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_model(
    model: str,
    output_dir: str | Path,
    tasks: Sequence[str] = ("paper",),
    *,
    name: str | None = None,
    limit: int | float | None = None,
    batch_size: int | str = "auto",
    device: str | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    apply_chat_template: bool | str = "auto",
    fewshot_as_multiturn: bool = True,
    system_instruction: str | None = None,
    gen_kwargs: str | None = None,
    peft: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    model_args: str | Mapping[str, Any] | None = None,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved model (a local directory or hub id) with lm-eval's HF backend; write JSON + Markdown.

    Args:
        model: path of the saved model (or of the base model when `peft` is an adapter).
        output_dir: where `results.json`, `results.md` (and, with `log_samples`, `samples_<task>.jsonl`) go.
        tasks: lm-eval task names and/or presets (`"paper"` = IFEval, GSM8k, GPQA few-shot, GPQA few-shot CoT).
        limit: examples per task (testing only: the table then says the numbers are not comparable).
        num_fewshot: an int for every task (lm-eval's `--num_fewshot`), or `{task regex: shots}` merged over
            `DEFAULT_NUM_FEWSHOT`; `None` keeps the defaults (5 for GSM8k and GPQA, the YAML's value otherwise).
        apply_chat_template: `"auto"` applies it when the tokenizer has one (SFT/SRPPO models), not for base models.
        fewshot_as_multiturn: few-shot examples as user/assistant turns (only used with a chat template).
        include_path: a directory of extra lm-eval task YAMLs (e.g. a local task).
        model_args: extra HF-backend arguments, `"k=v,k=v"` or a dict (e.g. `max_length=4096`).

    Returns the `results.json` content: `name`, `model`, `tasks`, `settings`, `summary` (see `summarize`), `lm_eval`
    (lm-eval's raw results without per-sample logs), `wall_time_s`.
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable, simple_parse_args_string

    task_names = expand_tasks(tasks)
    output_dir = Path(output_dir)
    task_manager = task_manager_for(str(Path(include_path).resolve()) if include_path else None)
    unknown = [task for task in task_names if task not in task_manager.all_tasks]
    if unknown:
        hints = {task: difflib.get_close_matches(task, task_manager.all_tasks, n=3) for task in unknown}
        raise ValueError(f"lm-eval does not know the task(s) {unknown} (closest names: {hints}).")

    use_chat_template = _resolve_chat_template(apply_chat_template, tokenizer or peft or model)
    args: dict[str, Any] = {"pretrained": model, "dtype": dtype, "trust_remote_code": False}
    if peft:
        args["peft"] = peft
    if tokenizer:
        args["tokenizer"] = tokenizer
    if model_args:
        args.update(simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args))

    # Per-task shot counts: lm-eval's `num_fewshot` argument is global, so set them on the Task objects instead.
    task_specs: list[Any] = []
    shots: dict[str, int | None] = {}
    for task in task_names:
        wanted = _fewshot_for(task, num_fewshot)
        shots[task] = wanted
        if wanted is None:
            task_specs.append(task)
            continue
        loaded = task_manager.load([task])
        for task_obj in loaded["tasks"].values():
            task_obj.set_config(key="num_fewshot", value=wanted)
        task_specs.extend(loaded["tasks"].values())

    settings = {
        "model_args": {k: str(v) for k, v in args.items()},
        "tasks": task_names,
        "num_fewshot": shots,
        "limit": limit,
        "batch_size": batch_size,
        "device": device or _default_device(),
        "apply_chat_template": use_chat_template,
        "fewshot_as_multiturn": fewshot_as_multiturn and use_chat_template,
        "system_instruction": system_instruction,
        "gen_kwargs": gen_kwargs,
        "bootstrap_iters": bootstrap_iters,
        "include_path": str(include_path) if include_path else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    start = time.time()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=task_specs,
        batch_size=batch_size,
        device=settings["device"],
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        system_instruction=system_instruction,
        apply_chat_template=use_chat_template,
        fewshot_as_multiturn=settings["fewshot_as_multiturn"],
        gen_kwargs=gen_kwargs,
        task_manager=task_manager,
    )
    wall_time = time.time() - start
    if results is None:  # not the main process of a distributed run
        return {}

    samples = results.pop("samples", None)
    name = name or Path(peft or model).name
    report = {
        "name": name,
        "model": model,
        "peft": peft,
        "tasks": task_names,
        "settings": settings,
        "summary": summarize(results),
        "wall_time_s": round(wall_time, 2),
        "lm_eval": results,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2, default=handle_non_serializable))
    (output_dir / "results.md").write_text(render_markdown(name, report["summary"], settings))
    if samples:
        for task, task_samples in samples.items():
            with open(output_dir / f"samples_{task}.jsonl", "w") as f:
                for sample in task_samples:
                    f.write(json.dumps(sample, default=handle_non_serializable) + "\n")
    return json.loads(json.dumps(report, default=handle_non_serializable))


def combine_results(result_files: Sequence[str | Path], output_dir: str | Path) -> str:
    """One paper-layout table with a row per `results.json`; written to `output_dir/results.md` and returned."""
    rows: dict[str, Mapping[str, float | None]] = {}
    for path in result_files:
        report = json.loads(Path(path).read_text())
        if "summary" not in report:
            raise ValueError(f"{path} is not a results.json written by srppo_trl.evaluation.lm_eval_wrapper.")
        label = report.get("name") or Path(path).parent.name
        while label in rows:
            label += "'"
        rows[label] = report["summary"]["columns"]
    table = "# lm-eval results\n\n" + markdown_table(rows)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "results.md").write_text(table)
    return table


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m srppo_trl.evaluation.lm_eval_wrapper",
        description="Evaluate a saved model on the SRPPO paper's lm-eval benchmarks (IFEval, GSM8k, GPQA).",
    )
    parser.add_argument("--model", help="saved model directory (or hub id); the base model when --peft is given")
    parser.add_argument("--output_dir", required=True, help="where results.json and results.md are written")
    parser.add_argument("--tasks", nargs="+", default=["paper"], help="lm-eval task names or presets: paper, gpqa")
    parser.add_argument("--name", default=None, help="row label in the table (default: the model directory name)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (<1: a fraction); tests only")
    parser.add_argument("--batch_size", default="auto", help="an int or 'auto' (lm-eval's batch size search)")
    parser.add_argument("--device", default=None, help="cuda, cuda:0, cpu ... (default: cuda if available)")
    parser.add_argument("--include_path", default=None, help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--num_fewshot", type=int, default=None, help="override every task's shot count")
    parser.add_argument(
        "--apply_chat_template", default="auto", help="auto (if the tokenizer has a chat template), true or false"
    )
    parser.add_argument("--no_fewshot_as_multiturn", action="store_true", help="few-shot examples in one user turn")
    parser.add_argument("--system_instruction", default=None)
    parser.add_argument("--gen_kwargs", default=None, help="e.g. 'max_gen_toks=512' (lm-eval syntax)")
    parser.add_argument("--peft", default=None, help="a PEFT adapter directory applied on --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--model_args", default=None, help="extra HF-backend args, 'k=v,k=v'")
    parser.add_argument("--bootstrap_iters", type=int, default=100_000, help="0 skips the stderr bootstrap")
    parser.add_argument("--log_samples", action="store_true", help="also write samples_<task>.jsonl")
    parser.add_argument(
        "--combine", nargs="+", default=None, metavar="RESULTS_JSON", help="only build a table from results.json files"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | str:
    args = build_parser().parse_args(argv)
    if args.combine:
        table = combine_results(args.combine, args.output_dir)
        print(table)
        return table
    if not args.model:
        raise ValueError("--model is required (the saved model to evaluate), unless --combine is given.")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    report = evaluate_model(
        args.model,
        args.output_dir,
        args.tasks,
        name=args.name,
        limit=limit,
        batch_size=args.batch_size,
        device=args.device,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=not args.no_fewshot_as_multiturn,
        system_instruction=args.system_instruction,
        gen_kwargs=args.gen_kwargs,
        peft=args.peft,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        model_args=args.model_args,
        bootstrap_iters=args.bootstrap_iters,
        log_samples=args.log_samples,
    )
    if report:
        print(Path(args.output_dir, "results.md").read_text())
    return report


if __name__ == "__main__":
    main()
