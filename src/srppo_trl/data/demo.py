"""The small demo data shipped with the package (see `srppo_trl/data/README.md` for sources and license).

    sft = load_demo_sft()          # column "messages": user prompt + assistant demonstration (~300 rows)
    prompts = load_demo_prompts()  # column "prompt": chat-format prompt messages for PPO (700 rows)

Built by `scripts/make_demo_data.py`. The PPO prompts use different base tasks from the demonstrations (minimal
overlap), and the offline benchmark's evaluation prompts are disjoint from both.
"""

from __future__ import annotations

import json
from importlib import resources


DEMO_SFT_FILE = "demo_sft.jsonl"
DEMO_PROMPTS_FILE = "demo_prompts.jsonl"
METADATA_COLUMNS = ("source", "base_task", "instruction_id_list", "kwargs", "answer")


def read_demo_rows(name: str) -> list[dict]:
    """The raw rows of a shipped demo file (`demo_sft.jsonl` or `demo_prompts.jsonl`), all fields kept."""
    if name not in (DEMO_SFT_FILE, DEMO_PROMPTS_FILE):
        raise ValueError(f"name must be {DEMO_SFT_FILE!r} or {DEMO_PROMPTS_FILE!r}, got {name!r}.")
    text = resources.files("srppo_trl").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _to_dataset(rows: list[dict], column: str, with_metadata: bool):
    from datasets import Dataset

    records = []
    for row in rows:
        record = {column: row[column]}
        if with_metadata:
            record.update(
                source=row["source"],
                base_task=row["base_task"],
                instruction_id_list=row["instruction_id_list"],
                kwargs=json.dumps(row["kwargs"]),  # JSON text: per-instruction argument dicts differ in keys
                answer=row.get("answer"),
            )
        records.append(record)
    return Dataset.from_list(records)


def load_demo_sft(with_metadata: bool = False):
    """The demonstrations as a `datasets.Dataset` with column `messages` (user + assistant turns).

    With `with_metadata`, also `source` ("instruction" or "arithmetic"), `base_task`, `instruction_id_list`,
    `kwargs` (a JSON string: one argument dict per instruction) and `answer` (arithmetic rows, else None).
    """
    return _to_dataset(read_demo_rows(DEMO_SFT_FILE), "messages", with_metadata)


def load_demo_prompts(with_metadata: bool = False):
    """The PPO prompts as a `datasets.Dataset` with column `prompt` (a list with one user message).

    `with_metadata` adds the same columns as `load_demo_sft`.
    """
    return _to_dataset(read_demo_rows(DEMO_PROMPTS_FILE), "prompt", with_metadata)
