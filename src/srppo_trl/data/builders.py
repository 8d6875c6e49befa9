"""Dataset builders for the three SRPPO data settings (arXiv 2510.21090, "Data settings").

SRPPO runs SFT on demonstrations, then PPO on a prompt set. The paper always takes the PPO prompts from UltraFeedback
and varies how much the SFT data overlaps them:

| setting      | SFT stages, in order                                                              |
|--------------|-----------------------------------------------------------------------------------|
| `min`        | 1. TULU-v2-mix                                                                    |
| `medium`     | 1. TULU-v2-mix, 2. 9k UltraFeedback prompts with their GPT-4 answers               |
| `diminished` | 1. and 2. as `medium`, 3. the same 9k GPT-4 subset + 40k more TULU-v2-mix examples |

Output formats are TRL's conversational ones, so `trl.SFTTrainer` and the SRPPO trainer take them as they are:

- SFT data: a column `messages` = `[{"role": ..., "content": ...}, ...]` ending with an assistant turn, plus `dataset`
  (source name) and `id`.
- Prompts: a column `prompt` = `[{"role": "user", "content": instruction}]` (prompt-only), plus `prompt_text` (the
  plain instruction) and, when the source has it, `source`.

Every builder takes `source`: a hub id (the default, loaded with `datasets.load_dataset`), a local file
(`.json`/`.jsonl`/`.parquet`/`.csv`), a local folder (`save_to_disk` output or data files), or an in-memory
`Dataset`/`DatasetDict`. Each checks the columns it needs and raises `ValueError` naming the missing one.

Sampling is deterministic: `num_samples` rows are the first `num_samples` of `numpy.random.default_rng(seed)
.permutation(n)` over the eligible rows, so a given seed always picks the same rows and a smaller sample is a prefix
of a larger one. `num_samples=None` keeps every eligible row in source order.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Union

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value


TULU_ID = "allenai/tulu-v2-sft-mixture"
ULTRAFEEDBACK_ID = "openbmb/UltraFeedback"

SETTINGS = ("min", "medium", "diminished")
"""The paper's data settings: minimum, medium and diminished overlap of the SFT data with the PPO prompts."""

GPT4_MODEL = "gpt-4"
"""The `model` name of GPT-4's completion in UltraFeedback."""

ROLES = ("system", "user", "assistant")

MESSAGES_FEATURE = datasets.List({"role": Value("string"), "content": Value("string")})
SFT_FEATURES = Features({"dataset": Value("string"), "id": Value("string"), "messages": MESSAGES_FEATURE})

DatasetSource = Union[str, os.PathLike, Dataset, DatasetDict]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_BATCH_SIZE = 1000


class SFTStage(NamedTuple):
    """One SFT stage: run SFT on `dataset`, starting from the model the previous stage produced."""

    name: str
    dataset: Dataset


# --------------------------------------------------------------------------------------------------------------------
# Loading and schema checks
# --------------------------------------------------------------------------------------------------------------------


def _hub_unreachable_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError  # raised offline for files not in the cache

        errors.append(LocalEntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of datasets
        pass
    try:
        from requests.exceptions import ConnectionError as RequestsConnectionError

        errors.append(RequestsConnectionError)
    except ImportError:  # pragma: no cover - requests is optional
        pass
    return tuple(errors)


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything with a file suffix, a leading `.`/`/`/`~` or 2+ slashes is a path."""
    return (
        Path(source).suffix.lower() in _FILE_BUILDERS
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def load_source(source: DatasetSource, split: str = "train", name: str | None = None) -> Dataset:
    """Load one split of a dataset from a hub id, a local file or folder, or pass an in-memory dataset through.

    Args:
        source: a hub id (`owner/name`), a `.json`/`.jsonl`/`.parquet`/`.csv`/`.arrow` file, a folder (written by
            `Dataset.save_to_disk`, or holding data files), a `Dataset` (returned as is) or a `DatasetDict`.
        split: the split to take from a hub id, a folder or a `DatasetDict` (a single file is one split).
        name: how error messages call this dataset (defaults to `source`).

    Raises:
        ValueError: the file does not exist, has an unknown type, or the split is missing.
        ConnectionError: `source` is a hub id and the Hugging Face Hub could not be reached.
    """
    label = name or _describe(source)
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"The {label} DatasetDict has no split '{split}' (its splits are: {', '.join(source)}).")
        return source[split]
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError(f"The {label} dataset is a streaming (iterable) dataset: load it without `streaming=True`.")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"The {label} source must be a hub id, a local path or a `datasets.Dataset`, got {type(source).__name__}."
        )
    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"The {label} file '{path}' has an unsupported type: use one of {', '.join(sorted(_FILE_BUILDERS))}."
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return load_source(datasets.load_from_disk(str(path)), split=split, name=label)
        return datasets.load_dataset(str(path), split=split)
    if _looks_like_path(str(source)):
        raise ValueError(f"The {label} file or folder '{source}' does not exist.")
    try:
        return datasets.load_dataset(str(source), split=split)
    except _hub_unreachable_errors() as err:
        raise ConnectionError(
            f"Could not load the {label} dataset: the Hugging Face Hub could not be reached for '{source}' ({err}). "
            f"Pass a local path instead, e.g. a .jsonl file saved on a machine with network access with "
            f"`datasets.load_dataset('{source}', split='{split}').to_json('data.jsonl')`."
        ) from err


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{source}'"
    return f"in-memory {type(source).__name__}"


def check_columns(dataset: Dataset, required: Iterable[str], name: str) -> None:
    """Raise `ValueError` naming the dataset and every column of `required` it lacks."""
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        listed = ", ".join(f"'{column}'" for column in missing)
        raise ValueError(
            f"The {name} dataset has no column {listed} (its columns are: {', '.join(dataset.column_names)})."
        )


def check_list_of_dicts(dataset: Dataset, column: str, keys: Iterable[str], name: str) -> None:
    """Raise `ValueError` unless `dataset[column]` is a list of dicts holding every key of `keys`.

    Reads the Arrow schema only (no row is decoded). A column whose lists are all empty has no known item type and
    passes; its rows are then dropped as malformed by the builders.
    """
    feature = dataset.features[column]
    inner = feature.feature if isinstance(feature, (datasets.List, datasets.LargeList)) else None
    if isinstance(inner, Value) and inner.dtype == "null":
        return
    if not isinstance(inner, dict):
        raise ValueError(
            f"The {name} dataset's column '{column}' must be a list of dicts with keys {', '.join(keys)}, "
            f"but its type is {feature}."
        )
    missing = [key for key in keys if key not in inner]
    if missing:
        raise ValueError(
            f"The {name} dataset's column '{column}' holds dicts without the key "
            f"{', '.join(f'{column!r}[...][{key!r}]' for key in missing)} (they have: {', '.join(inner)})."
        )


def normalize_prompt(text: str) -> str:
    """The key prompts are compared by (deduplication, exclusion): whitespace runs collapsed to one space."""
    return " ".join(text.split())


def _batches(dataset: Dataset, columns: list[str]) -> Iterator[tuple[int, dict[str, list]]]:
    """Yield `(index of the first row, {column: values})` over `dataset`, decoding only `columns`."""
    start = 0
    for batch in dataset.select_columns(columns).iter(batch_size=_BATCH_SIZE):
        yield start, batch
        start += len(batch[columns[0]])


def _sample_positions(num_eligible: int, num_samples: int | None, seed: int, what: str) -> list[int]:
    """Positions (in `range(num_eligible)`) of a seeded sample of `num_samples`; all of them, in order, for `None`."""
    if num_samples is None:
        return list(range(num_eligible))
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer or None, got {num_samples!r}.")
    if num_samples > num_eligible:
        raise ValueError(f"Asked for {num_samples} {what} but only {num_eligible} are available.")
    return np.random.default_rng(seed).permutation(num_eligible)[:num_samples].tolist()


def _warn_dropped(reasons: Counter, total: int, name: str, what: str) -> None:
    if reasons:
        detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        warnings.warn(f"Dropped {sum(reasons.values())} of {total} {what} from {name}: {detail}.", stacklevel=3)


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------------------------------
# TULU-v2-mix (SFT demonstrations)
# --------------------------------------------------------------------------------------------------------------------


def conversation_problem(messages) -> str | None:
    """Why a conversation cannot be an SFT example, or `None` when it can.

    A usable conversation is a non-empty list of `{role, content}` dicts with roles in `ROLES` and string contents,
    has a user turn, ends with an assistant turn (the response SFT learns), and no user/assistant turn is blank.
    """
    if not isinstance(messages, list) or not messages:
        return "empty conversations"
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            return "with a message that is not a {role, content} dict of a known role"
    if not any(message["role"] == "user" for message in messages):
        return "without a user turn"
    if messages[-1]["role"] != "assistant":
        return "not ending with an assistant turn"
    if any(not message["content"].strip() for message in messages if message["role"] != "system"):
        return "with a blank user or assistant turn"
    return None


def first_user_content(messages: list[dict]) -> str:
    """The content of the first user turn (the prompt of a single-turn conversation)."""
    return next(message["content"] for message in messages if message["role"] == "user")


def _normalise_messages(dataset: Dataset) -> Dataset:
    """Cast `messages` to exactly `[{role, content}]` (strings), dropping any extra per-message keys."""
    inner = dataset.features["messages"].feature
    if not (isinstance(inner, dict) and set(inner) == {"role", "content"}):
        dataset = dataset.map(
            lambda batch: {
                "messages": [
                    [{"role": m["role"], "content": m["content"]} for m in conv] for conv in batch["messages"]
                ]
            },
            batched=True,
            features=Features({**dataset.features, "messages": MESSAGES_FEATURE}),
            desc="Keeping role and content of each message",
        )
    if dataset.features.type == SFT_FEATURES.type:  # Arrow types: same columns, same struct field order
        return dataset
    return dataset.cast(SFT_FEATURES)


def load_tulu_sft(
    source: DatasetSource = TULU_ID,
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 42,
    exclude_ids: Iterable[str] | None = None,
    exclude_prompts: Iterable[str] | None = None,
) -> Dataset:
    """Load TULU-v2-mix (or any `messages` dataset) as SFT conversations.

    Expected schema (`allenai/tulu-v2-sft-mixture`, 326,154 rows): `dataset` (source name), `id`, `messages`
    (`[{role, content}, ...]`). Only `messages` is required; a missing `id` becomes `"<split>-<row index>"` and a
    missing `dataset` becomes `"unknown"`, so ids stay stable for a given source.

    Malformed conversations (see `conversation_problem`) are dropped with one warning giving the counts.

    Args:
        source: hub id, local path or in-memory dataset (see `load_source`).
        split: the split to load.
        num_samples: how many conversations to sample (seeded); `None` keeps all, in source order.
        seed: the sampling seed.
        exclude_ids: ids to leave out (e.g. the ids of an earlier stage, to draw a disjoint sample).
        exclude_prompts: prompts to leave out: a conversation is dropped when its first user turn equals one of them
            (after `normalize_prompt`).

    Returns:
        A `Dataset` with columns `dataset`, `id`, `messages`.
    """
    name = f"TULU-v2 SFT ({_describe(source)})"
    dataset = load_source(source, split=split, name=name)
    check_columns(dataset, ["messages"], name)
    check_list_of_dicts(dataset, "messages", ("role", "content"), name)
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", [f"{split}-{index}" for index in range(len(dataset))])
    if "dataset" not in dataset.column_names:
        dataset = dataset.add_column("dataset", ["unknown"] * len(dataset))

    excluded_ids = set(exclude_ids or ())
    excluded_prompts = {normalize_prompt(prompt) for prompt in exclude_prompts or ()}
    dropped: Counter = Counter()
    keep: list[int] = []
    for start, batch in _batches(dataset, ["messages", "id"]):
        for offset, (messages, id_) in enumerate(zip(batch["messages"], batch["id"])):
            problem = conversation_problem(messages)
            if problem is not None:
                dropped[problem] += 1
            elif id_ in excluded_ids:
                dropped["excluded by id"] += 1
            elif excluded_prompts and normalize_prompt(first_user_content(messages)) in excluded_prompts:
                dropped["excluded by prompt"] += 1
            else:
                keep.append(start + offset)
    malformed = Counter({reason: n for reason, n in dropped.items() if not reason.startswith("excluded")})
    _warn_dropped(malformed, len(dataset), name, "conversations")

    positions = _sample_positions(
        len(keep),
        num_samples,
        seed,
        f"conversations from {name} (left after dropping {sum(dropped.values())} malformed or excluded ones)",
    )
    selected = dataset.select([keep[position] for position in positions])
    return _normalise_messages(selected.select_columns(["dataset", "id", "messages"]))


# --------------------------------------------------------------------------------------------------------------------
# UltraFeedback (PPO prompts and the 9k GPT-4 SFT subset)
# --------------------------------------------------------------------------------------------------------------------


def _as_prompt_messages(value) -> list[dict] | None:
    """A prompt as conversational messages: a string becomes one user turn; a message list must end with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if (
        isinstance(value, list)
        and value
        and conversation_problem([*value, {"role": "assistant", "content": "x"}]) is None
    ):
        if value[-1]["role"] == "user":
            return [{"role": message["role"], "content": message["content"]} for message in value]
    return None


def _prompt_key(messages: list[dict]) -> str:
    return normalize_prompt("\n".join(message["content"] for message in messages))


def _prompt_column(dataset: Dataset, prompt_column: str | None) -> str:
    if prompt_column is not None:
        return prompt_column
    return next((column for column in ("instruction", "prompt") if column in dataset.column_names), "instruction")


def to_prompt_dataset(
    dataset: Dataset,
    name: str,
    prompt_column: str | None = None,
    num_samples: int | None = None,
    seed: int = 42,
    exclude_prompts: Iterable[str] | None = None,
    deduplicate: bool = True,
) -> Dataset:
    """Turn a dataset of prompts into TRL's prompt-only conversational format.

    Args:
        dataset: rows with a prompt column holding a string (one user turn) or a list of `{role, content}` messages
            ending with a user turn.
        name: how messages call this dataset.
        prompt_column: the column holding the prompt; by default `instruction` (UltraFeedback), else `prompt`
            (`HuggingFaceH4/ultrafeedback_binarized`, plain prompt files).
        num_samples, seed: seeded sample size (`None` keeps all, in source order).
        exclude_prompts: prompt texts to leave out (compared after `normalize_prompt`).
        deduplicate: keep only the first occurrence of each prompt.

    Returns:
        A `Dataset` with columns `prompt` (`[{"role": "user", "content": ...}]`), `prompt_text` (the last user
        turn) and, when the input has it, `source`.
    """
    column = _prompt_column(dataset, prompt_column)
    check_columns(dataset, [column], name)
    has_source = "source" in dataset.column_names
    excluded = {normalize_prompt(prompt) for prompt in exclude_prompts or ()}
    seen: set[str] = set()
    dropped: Counter = Counter()
    rows: list[tuple[list[dict], str, str | None]] = []
    for _, batch in _batches(dataset, [column, *(["source"] if has_source else [])]):
        for offset, value in enumerate(batch[column]):
            messages = _as_prompt_messages(value)
            if messages is None:
                dropped["blank or malformed prompts"] += 1
                continue
            key = _prompt_key(messages)
            if key in excluded:
                dropped["excluded"] += 1
            elif deduplicate and key in seen:
                dropped["duplicates"] += 1
            else:
                seen.add(key)
                rows.append((messages, messages[-1]["content"], batch["source"][offset] if has_source else None))
    _warn_dropped(Counter({k: v for k, v in dropped.items() if k != "excluded"}), len(dataset), name, "prompts")

    positions = _sample_positions(len(rows), num_samples, seed, f"prompts from {name}")
    columns = {
        "prompt": [rows[position][0] for position in positions],
        "prompt_text": [rows[position][1] for position in positions],
    }
    features = {"prompt": MESSAGES_FEATURE, "prompt_text": Value("string")}
    if has_source:
        columns["source"] = [rows[position][2] for position in positions]
        features["source"] = Value("string")
    return Dataset.from_dict(columns, features=Features(features))


def load_ultrafeedback_prompts(
    source: DatasetSource = ULTRAFEEDBACK_ID,
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 42,
    exclude_prompts: Iterable[str] | None = None,
    prompt_column: str | None = None,
) -> Dataset:
    """UltraFeedback instructions as prompt-only conversations: `prompt = [{"role": "user", "content": instruction}]`.

    Expected schema (`openbmb/UltraFeedback`, ~64k rows, split `train`): `source`, `instruction`, `models`,
    `completions`, `correct_answers`, `incorrect_answers`; only `instruction` is used (or `prompt`, for
    `HuggingFaceH4/ultrafeedback_binarized` whose splits are `train_prefs`, ...). Blank and duplicate prompts are
    dropped with a warning. See `to_prompt_dataset` for the output columns.
    """
    name = f"UltraFeedback prompts ({_describe(source)})"
    dataset = load_source(source, split=split, name=name)
    return to_prompt_dataset(
        dataset, name, prompt_column=prompt_column, num_samples=num_samples, seed=seed, exclude_prompts=exclude_prompts
    )


def build_ppo_prompts(
    source: DatasetSource = ULTRAFEEDBACK_ID,
    num_samples: int | None = None,
    seed: int = 42,
    exclude_prompts: Iterable[str] | None = None,
    split: str = "train",
) -> Dataset:
    """The PPO prompt set `P`: UltraFeedback prompts (the paper uses all ~64k) in TRL's prompt-only format.

    The medium and diminished settings deliberately keep the 9k GPT-4 prompts in `P` (that is the overlap); pass
    `exclude_prompts=gpt4_subset["prompt_text"]` to study PPO on unseen prompts only.
    """
    return load_ultrafeedback_prompts(
        source, split=split, num_samples=num_samples, seed=seed, exclude_prompts=exclude_prompts
    )


def load_jsonl_prompts(
    path: str | os.PathLike, num_samples: int | None = None, seed: int = 42, prompt_column: str | None = None
) -> Dataset:
    """Prompts from a `.json`/`.jsonl` file with a `prompt` (string or messages) or `instruction` column."""
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"Expected a .json or .jsonl prompt file, got '{path}'.")
    name = f"prompt file '{path}'"
    return to_prompt_dataset(
        load_source(path, name=name), name, prompt_column=prompt_column, num_samples=num_samples, seed=seed
    )


def gpt4_response(completions) -> str | None:
    """The response of the first completion whose `model` is `"gpt-4"` and whose response is not blank, else `None`."""
    for completion in completions or ():
        if isinstance(completion, dict) and completion.get("model") == GPT4_MODEL:
            response = completion.get("response")
            if isinstance(response, str) and response.strip():
                return response
    return None


def build_ultrafeedback_gpt4_sft(
    source: DatasetSource = ULTRAFEEDBACK_ID,
    split: str = "train",
    num_samples: int | None = 9000,
    seed: int = 42,
) -> Dataset:
    """The paper's 9k SFT subset: UltraFeedback prompts paired with GPT-4's answer.

    Eligible prompts are the non-blank, distinct (after `normalize_prompt`) instructions whose `completions` include
    one with `model == "gpt-4"` and a non-blank `response`; `num_samples` of them are sampled with `seed`.

    Returns:
        A `Dataset` with columns `dataset` (`"ultrafeedback_gpt4"`), `id` (`"ultrafeedback-<sha1 of the prompt>"`),
        `messages` (`[user: instruction, assistant: GPT-4 response]`), `prompt_text` and, when present, `source`.

    Raises:
        ValueError: a required column is missing, or fewer than `num_samples` prompts have a GPT-4 answer.
    """
    name = f"UltraFeedback ({_describe(source)})"
    dataset = load_source(source, split=split, name=name)
    check_columns(dataset, ["instruction", "completions"], name)
    check_list_of_dicts(dataset, "completions", ("model", "response"), name)
    has_source = "source" in dataset.column_names

    seen: set[str] = set()
    rows: list[tuple[str, str, str | None]] = []
    for _, batch in _batches(dataset, ["instruction", "completions", *(["source"] if has_source else [])]):
        for offset, (instruction, completions) in enumerate(zip(batch["instruction"], batch["completions"])):
            if not isinstance(instruction, str) or not instruction.strip():
                continue
            response = gpt4_response(completions)
            key = normalize_prompt(instruction)
            if response is None or key in seen:
                continue
            seen.add(key)
            rows.append((instruction, response, batch["source"][offset] if has_source else None))

    if num_samples is not None and num_samples > len(rows):
        raise ValueError(
            f"Asked for {num_samples} prompts with a GPT-4 answer but only {len(rows)} of the {len(dataset)} prompts "
            f"in {name} have one (a completion with model == '{GPT4_MODEL}'); lower num_samples."
        )
    positions = _sample_positions(len(rows), num_samples, seed, f"prompts with a GPT-4 answer in {name}")
    selected = [rows[position] for position in positions]
    columns = {
        "dataset": ["ultrafeedback_gpt4"] * len(selected),
        "id": [_stable_id("ultrafeedback", instruction) for instruction, _, _ in selected],
        "messages": [
            [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
            for instruction, response, _ in selected
        ],
        "prompt_text": [instruction for instruction, _, _ in selected],
    }
    features = {**SFT_FEATURES, "prompt_text": Value("string")}
    if has_source:
        columns["source"] = [row_source for _, _, row_source in selected]
        features["source"] = Value("string")
    return Dataset.from_dict(columns, features=Features(features))


# --------------------------------------------------------------------------------------------------------------------
# The three data settings
# --------------------------------------------------------------------------------------------------------------------


def _all_prompt_keys(dataset: Dataset, column: str = "instruction") -> set[str]:
    keys: set[str] = set()
    for _, batch in _batches(dataset, [column]):
        keys.update(normalize_prompt(text) for text in batch[column] if isinstance(text, str))
    return keys


def build_sft_data(
    setting: str,
    *,
    tulu_source: DatasetSource = TULU_ID,
    ultrafeedback_source: DatasetSource = ULTRAFEEDBACK_ID,
    tulu_split: str = "train",
    ultrafeedback_split: str = "train",
    tulu_num_samples: int | None = None,
    gpt4_num_samples: int | None = 9000,
    extra_tulu_num_samples: int | None = 40000,
    seed: int = 42,
) -> list[SFTStage]:
    """The SFT stages of one data setting, in the order to train them (each stage starts from the previous model).

    - `"min"` (minimum overlap): `[("tulu", TULU-v2-mix)]`.
    - `"medium"`: `[("tulu", ...), ("ultrafeedback_gpt4", the 9k GPT-4 subset)]`.
    - `"diminished"`: the medium stages, then `("ultrafeedback_gpt4_plus_tulu", 9k subset + 40k TULU, shuffled)`.

    Choices for the diminished stage (the paper says only "the 9k subset plus 40k more TULU-v2-mix examples"):

    - The 9k part is the same subset as stage 2 (same seed): the paper continues from the medium-overlap model "on the
      9k subset plus ...", so it revisits those examples, now diluted.
    - The 40k TULU examples exclude every conversation whose first user turn is an UltraFeedback prompt (any prompt
      of the split, not only the 9k). The point of the stage is to lower the share of SFT data that overlaps the PPO
      prompts; a TULU example repeating a PPO prompt would raise it again. TULU-v2 shares sources with UltraFeedback
      (ShareGPT, FLAN, Evol-Instruct), so such matches can exist.
    - They are disjoint from stage 1 when stage 1 is a sample (`tulu_num_samples` set), so the stage brings
      examples the model has not seen. When stage 1 is the whole mixture, as in the paper, no unseen example is left
      and the 40k are a seeded re-sample of it (replay), which is what the paper's wording implies.
    - The two parts are concatenated and shuffled with `seed`, with the columns `dataset`, `id`, `messages`.

    Args:
        setting: one of `SETTINGS`.
        tulu_source, ultrafeedback_source: hub ids, local paths or in-memory datasets (see `load_source`).
        tulu_split, ultrafeedback_split: the splits to use.
        tulu_num_samples: stage-1 size (`None`: all of TULU-v2-mix, as in the paper).
        gpt4_num_samples: size of the GPT-4 subset (9,000 in the paper).
        extra_tulu_num_samples: TULU examples added in the diminished stage (40,000 in the paper).
        seed: seed of every sample and of the final shuffle.

    Returns:
        A list of `SFTStage(name, dataset)`; each dataset has at least the columns `dataset`, `id`, `messages`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"Unknown data setting {setting!r}: use one of {', '.join(repr(s) for s in SETTINGS)}.")
    tulu = load_source(tulu_source, split=tulu_split, name=f"TULU-v2 SFT ({_describe(tulu_source)})")
    stage1 = load_tulu_sft(tulu, split=tulu_split, num_samples=tulu_num_samples, seed=seed)
    stages = [SFTStage("tulu", stage1)]
    if setting == "min":
        return stages

    ultrafeedback = load_source(
        ultrafeedback_source, split=ultrafeedback_split, name=f"UltraFeedback ({_describe(ultrafeedback_source)})"
    )
    gpt4 = build_ultrafeedback_gpt4_sft(ultrafeedback, num_samples=gpt4_num_samples, seed=seed)
    stages.append(SFTStage("ultrafeedback_gpt4", gpt4))
    if setting == "medium":
        return stages

    check_columns(ultrafeedback, ["instruction"], f"UltraFeedback ({_describe(ultrafeedback_source)})")
    extra = load_tulu_sft(
        tulu,
        split=tulu_split,
        num_samples=extra_tulu_num_samples,
        seed=seed,
        exclude_ids=set(stage1["id"]) if tulu_num_samples is not None else None,
        exclude_prompts=_all_prompt_keys(ultrafeedback),
    )
    mixed = datasets.concatenate_datasets([gpt4.select_columns(list(SFT_FEATURES)), extra]).shuffle(seed=seed)
    stages.append(SFTStage("ultrafeedback_gpt4_plus_tulu", mixed.flatten_indices()))
    return stages


# --------------------------------------------------------------------------------------------------------------------
# Checks of a stage's data before training (the pipeline runs them before SFT, so a bad prompt set fails in seconds)
# --------------------------------------------------------------------------------------------------------------------


def check_sft_data(dataset: Dataset, name: str) -> None:
    """Raise `ValueError` unless `dataset` is a non-empty SFT dataset whose `messages` are all usable conversations.

    Usable means what `conversation_problem` accepts (the pipeline trains on the last assistant turn of each).
    """
    check_columns(dataset, ["messages"], name)
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: it needs at least one conversation in `messages`.")
    reasons, first_bad = Counter(), None
    for start, batch in _batches(dataset, ["messages"]):
        for offset, messages in enumerate(batch["messages"]):
            problem = conversation_problem(messages)
            if problem is not None:
                reasons[problem] += 1
                first_bad = start + offset if first_bad is None else first_bad
    if reasons:
        detail = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        raise ValueError(
            f"The {name} dataset has {sum(reasons.values())} unusable conversation(s) ({detail}; the first is row "
            f"{first_bad}): drop them, e.g. with `dataset.filter(lambda x: conversation_problem(x['messages']) is None)`."
        )


def prompt_input_ids(prompt, tokenizer) -> list[int]:
    """The token ids `SRPPOTrainer` generates from: plain text as is, chat messages through the chat template, led by
    the BOS the tokenizer adds to text (`srppo_trl.data.tokenization.tokenize_prompt`)."""
    from .tokenization import tokenize_prompt

    return tokenize_prompt(tokenizer, prompt)


def check_prompt_lengths(
    dataset: Dataset,
    tokenizer,
    *,
    max_prompt_length: int | None,
    response_length: int,
    context: int | None,
    name: str,
) -> list[int]:
    """Raise `ValueError` if `dataset`'s prompts cannot be trained on; return their lengths in tokens.

    The checks `SRPPOTrainer` makes when it is built, made here without a model so a pipeline can run them before
    SFT: an `input_ids` column (used as given) or a `prompt` column (tokenized as the trainer does,
    `prompt_input_ids`, so pass the tokenizer it will get), at least one row, and `check_lengths`.
    """
    if "input_ids" not in dataset.column_names and "prompt" not in dataset.column_names:
        raise ValueError(
            f"{name} has neither an `input_ids` nor a `prompt` column (it has {dataset.column_names}): pass "
            "tokenized prompts in `input_ids`, or prompts in a `prompt` column (plain text or chat messages)."
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one prompt.")
    if "input_ids" in dataset.column_names:
        lengths = [len(ids) for _, batch in _batches(dataset, ["input_ids"]) for ids in batch["input_ids"]]
    else:
        lengths = [
            len(prompt_input_ids(prompt, tokenizer))
            for _, batch in _batches(dataset, ["prompt"])
            for prompt in batch["prompt"]
        ]
    check_lengths(
        lengths, max_prompt_length=max_prompt_length, response_length=response_length, context=context, name=name
    )
    return lengths


def check_lengths(lengths, *, max_prompt_length: int | None, response_length: int, context: int | None, name: str):
    """Refuse prompts longer than `max_prompt_length` (None: no limit) and prompts that leave fewer than
    `response_length` tokens of the model's `context` (None: unknown, not checked). `lengths`: tokens per prompt."""
    longest = max(lengths)
    if max_prompt_length is not None and longest > max_prompt_length:
        count = sum(length > max_prompt_length for length in lengths)
        raise ValueError(
            f"{count} prompt(s) in {name} are longer than max_prompt_length={max_prompt_length} tokens "
            f"(the longest, row {lengths.index(longest)}, has {longest}): filter them out or raise max_prompt_length."
        )
    if context is not None and longest + response_length > context:
        raise ValueError(
            f"The longest prompt in {name} ({longest} tokens) plus response_length={response_length} exceeds "
            f"the model's context of {context} tokens: shorten the prompts or lower response_length."
        )


__all__ = [
    "GPT4_MODEL",
    "SETTINGS",
    "TULU_ID",
    "ULTRAFEEDBACK_ID",
    "SFTStage",
    "build_ppo_prompts",
    "build_sft_data",
    "check_lengths",
    "build_ultrafeedback_gpt4_sft",
    "check_columns",
    "check_list_of_dicts",
    "check_prompt_lengths",
    "check_sft_data",
    "conversation_problem",
    "gpt4_response",
    "load_jsonl_prompts",
    "load_source",
    "load_tulu_sft",
    "load_ultrafeedback_prompts",
    "normalize_prompt",
    "prompt_input_ids",
    "to_prompt_dataset",
]
