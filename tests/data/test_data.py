"""Tests of srppo_trl.data.builders on small made-up fixtures (tests/fixtures/), with the network blocked."""

import json
import socket
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from srppo_trl.data import builders as data
from srppo_trl.data.builders import (
    SETTINGS,
    build_ppo_prompts,
    build_sft_data,
    build_ultrafeedback_gpt4_sft,
    check_columns,
    conversation_problem,
    load_jsonl_prompts,
    load_source,
    load_tulu_sft,
    load_ultrafeedback_prompts,
)


FIXTURES = Path(__file__).parents[1] / "fixtures"
TULU = FIXTURES / "tulu_v2_sample.jsonl"
ULTRAFEEDBACK = FIXTURES / "ultrafeedback_sample.jsonl"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


TULU_ROWS = read_jsonl(TULU)
UF_ROWS = read_jsonl(ULTRAFEEDBACK)
# Independent reading of the fixtures, to check the builders against.
MALFORMED_TULU_IDS = {"sharegpt_bad_empty_answer", "oasst1_bad_ends_with_user"}
VALID_TULU_IDS = [row["id"] for row in TULU_ROWS if row["id"] not in MALFORMED_TULU_IDS]
GPT4_ANSWERS = {
    row["instruction"]: next(c["response"] for c in row["completions"] if c["model"] == "gpt-4")
    for row in UF_ROWS
    if "gpt-4" in row["models"]
}
SHARED_PROMPT = "Suggest a name for a bakery that sells only bread."  # a UF instruction that is also a TULU prompt


pytestmark = pytest.mark.filterwarnings("ignore:Dropped 2 of 31 conversations")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fail any test that opens a socket: everything here must work offline."""

    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to use the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def tulu():
    return load_source(TULU)


@pytest.fixture(scope="module")
def ultrafeedback():
    return load_source(ULTRAFEEDBACK)


def test_fixtures_have_the_documented_schemas(tulu, ultrafeedback):
    assert set(tulu.column_names) == {"dataset", "id", "messages"}
    assert len({row["dataset"] for row in TULU_ROWS}) >= 10
    assert set(ultrafeedback.column_names) == {
        "source",
        "instruction",
        "models",
        "completions",
        "correct_answers",
        "incorrect_answers",
    }
    assert set(ultrafeedback.features["completions"].feature) == {
        "model",
        "response",
        "overall_score",
        "fine-grained_score",
        "annotations",
        "critique",
        "custom_system_prompt",
        "principle",
    }
    assert 0.5 < len(GPT4_ANSWERS) / len(UF_ROWS) < 0.8


# ---------------------------------------------------------------------------------------------------------------------
# Loading and schema checks
# ---------------------------------------------------------------------------------------------------------------------


def test_load_tulu_from_jsonl_path_drops_malformed_with_a_count():
    with pytest.warns(UserWarning, match=r"Dropped 2 of 31 conversations") as record:
        sft = load_tulu_sft(str(TULU))
    message = str(record[0].message)
    assert "blank user or assistant turn" in message and "not ending with an assistant turn" in message
    assert sft.column_names == ["dataset", "id", "messages"]
    assert sft["id"] == VALID_TULU_IDS  # num_samples=None keeps source order
    assert all(messages[-1]["role"] == "assistant" for messages in sft["messages"])
    assert sft.features["messages"] == data.MESSAGES_FEATURE


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "empty"),
        (None, "empty"),
        ([{"role": "user", "content": "hi"}], "not ending with an assistant turn"),
        ([{"role": "assistant", "content": "hi"}], "without a user turn"),
        ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}], "known role"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "yo"}], "known role"),
        ([{"role": "user", "content": " \n"}, {"role": "assistant", "content": "yo"}], "blank"),
        (
            [
                {"role": "system", "content": ""},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ],
            None,
        ),
    ],
)
def test_conversation_problem(messages, problem):
    found = conversation_problem(messages)
    if problem is None:
        assert found is None
    else:
        assert problem in found


def test_tulu_schema_error_names_the_column_and_dataset():
    dataset = Dataset.from_list([{"id": "a", "conversations": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"TULU-v2 SFT .* no column 'messages'"):
        load_tulu_sft(dataset)


def test_tulu_messages_without_role_are_rejected():
    sharegpt_style = Dataset.from_list([{"messages": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(ValueError, match=r"'messages'\[\.\.\.\]\['role'\]"):
        load_tulu_sft(sharegpt_style)
    as_strings = Dataset.from_list([{"messages": "user: hi"}])
    with pytest.raises(ValueError, match="must be a list of dicts"):
        load_tulu_sft(as_strings)


def test_tulu_fills_missing_id_and_drops_extra_message_keys():
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}", "name": "x"},
                {"role": "assistant", "content": "a", "name": "y"},
            ]
        }
        for i in range(3)
    ]
    sft = load_tulu_sft(Dataset.from_list(rows))
    assert sft["id"] == ["train-0", "train-1", "train-2"]
    assert sft["dataset"] == ["unknown"] * 3
    assert sft[0]["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}]


def test_tulu_selection_is_deterministic(tulu):
    first = load_tulu_sft(tulu, num_samples=10, seed=1)["id"]
    assert load_tulu_sft(tulu, num_samples=10, seed=1)["id"] == first
    assert load_tulu_sft(tulu, num_samples=10, seed=2)["id"] != first
    assert load_tulu_sft(tulu, num_samples=4, seed=1)["id"] == first[:4]  # a smaller sample is a prefix
    assert set(first) <= set(VALID_TULU_IDS)
    assert len(set(first)) == 10


def test_tulu_exclusion_by_id_and_prompt(tulu):
    excluded = set(VALID_TULU_IDS[:5])
    rest = load_tulu_sft(
        tulu, exclude_ids=excluded, exclude_prompts=["  Suggest a name for a bakery\nthat sells only bread. "]
    )
    assert set(rest["id"]) == set(VALID_TULU_IDS[5:]) - {"wizardlm_2"}
    with pytest.raises(ValueError, match=rf"Asked for 24 conversations .* only {len(rest)} are available"):
        load_tulu_sft(tulu, num_samples=24, exclude_ids=excluded, exclude_prompts=[SHARED_PROMPT])


def test_num_samples_must_be_a_non_negative_integer(tulu):
    with pytest.raises(ValueError, match="non-negative integer"):
        load_tulu_sft(tulu, num_samples=-1)


def test_load_source_accepts_datasetdict_and_saved_folders(tmp_path, ultrafeedback):
    saved = tmp_path / "uf"
    DatasetDict({"train": ultrafeedback}).save_to_disk(str(saved))
    assert load_ultrafeedback_prompts(saved)["prompt_text"] == [row["instruction"] for row in UF_ROWS]
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_source(DatasetDict({"train": ultrafeedback}), split="test")


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tulu_sft(str(tmp_path / "nope.jsonl"))


def test_unreachable_hub_says_so_and_suggests_a_local_path(monkeypatch):
    calls = []

    def offline_load_dataset(path, *args, **kwargs):
        calls.append(path)
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    with pytest.raises(ConnectionError, match=r"Hub could not be reached .* Pass a local path"):
        load_tulu_sft()
    with pytest.raises(ConnectionError, match="openbmb/UltraFeedback"):
        build_ppo_prompts()
    assert calls == [data.TULU_ID, data.ULTRAFEEDBACK_ID]


def test_check_columns_lists_every_missing_column():
    with pytest.raises(ValueError, match=r"The toy dataset has no column 'b', 'c' \(its columns are: a\)"):
        check_columns(Dataset.from_dict({"a": [1]}), ["a", "b", "c"], "toy")


# ---------------------------------------------------------------------------------------------------------------------
# UltraFeedback prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_ultrafeedback_prompts_are_trl_prompt_only_conversations():
    from trl.data_utils import is_conversational

    prompts = load_ultrafeedback_prompts(str(ULTRAFEEDBACK))
    assert prompts.column_names == ["prompt", "prompt_text", "source"]
    assert len(prompts) == len(UF_ROWS)
    for row, raw in zip(prompts, UF_ROWS):
        assert row["prompt"] == [{"role": "user", "content": raw["instruction"]}]
        assert row["source"] == raw["source"]
    assert is_conversational(prompts[0])


def test_ultrafeedback_prompts_schema_error():
    with pytest.raises(ValueError, match=r"UltraFeedback prompts .* no column 'instruction'"):
        load_ultrafeedback_prompts(Dataset.from_dict({"question": ["hi"]}))


def test_ultrafeedback_prompts_drop_blank_and_duplicate_prompts():
    dataset = Dataset.from_dict({"instruction": ["a  b", "", "c", "a b", "d"]})
    with pytest.warns(UserWarning, match=r"Dropped 2 of 5 prompts .*1 blank or malformed prompts, 1 duplicates"):
        prompts = load_ultrafeedback_prompts(dataset)
    assert prompts["prompt_text"] == ["a  b", "c", "d"]


def test_ppo_prompts_sampling_and_exclusion(ultrafeedback):
    everything = [row["instruction"] for row in UF_ROWS]
    sample = build_ppo_prompts(ultrafeedback, num_samples=12, seed=3)["prompt_text"]
    assert sample == build_ppo_prompts(ultrafeedback, num_samples=12, seed=3)["prompt_text"]
    assert sample != build_ppo_prompts(ultrafeedback, num_samples=12, seed=4)["prompt_text"]
    gpt4 = build_ultrafeedback_gpt4_sft(ultrafeedback, num_samples=None)
    unseen = build_ppo_prompts(ultrafeedback, exclude_prompts=gpt4["prompt_text"])
    assert unseen["prompt_text"] == [p for p in everything if p not in GPT4_ANSWERS]


def test_binarized_style_prompt_column_and_jsonl_prompt_files(tmp_path):
    binarized = Dataset.from_dict({"prompt": ["x?", "y?"], "prompt_id": ["1", "2"], "chosen": [[], []]})
    assert load_ultrafeedback_prompts(binarized)["prompt"] == [
        [{"role": "user", "content": "x?"}],
        [{"role": "user", "content": "y?"}],
    ]
    plain = tmp_path / "prompts.jsonl"
    plain.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    assert load_jsonl_prompts(plain)["prompt_text"] == ["first", "second"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}) + "\n"
    )
    loaded = load_jsonl_prompts(chat)
    assert loaded[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert loaded[0]["prompt_text"] == "Hi?"
    with pytest.raises(ValueError, match=r"\.json or \.jsonl"):
        load_jsonl_prompts(tmp_path / "prompts.txt")


# ---------------------------------------------------------------------------------------------------------------------
# The 9k GPT-4 subset
# ---------------------------------------------------------------------------------------------------------------------


def test_gpt4_subset_pairs_each_prompt_with_the_gpt4_answer(ultrafeedback):
    subset = build_ultrafeedback_gpt4_sft(str(ULTRAFEEDBACK), num_samples=None)
    assert len(subset) == len(GPT4_ANSWERS)
    for row in subset:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt_text"]}
        assert assistant == {"role": "assistant", "content": GPT4_ANSWERS[row["prompt_text"]]}
    assert set(subset["dataset"]) == {"ultrafeedback_gpt4"}
    assert len(set(subset["id"])) == len(subset)


def test_gpt4_subset_sampling_is_deterministic(ultrafeedback):
    first = build_ultrafeedback_gpt4_sft(ultrafeedback, num_samples=8, seed=0)["prompt_text"]
    assert first == build_ultrafeedback_gpt4_sft(ultrafeedback, num_samples=8, seed=0)["prompt_text"]
    assert first != build_ultrafeedback_gpt4_sft(ultrafeedback, num_samples=8, seed=1)["prompt_text"]
    assert set(first) <= set(GPT4_ANSWERS)


def test_gpt4_subset_too_large_says_how_many_prompts_have_an_answer(ultrafeedback):
    with pytest.raises(ValueError, match=rf"only {len(GPT4_ANSWERS)} of the {len(UF_ROWS)} prompts"):
        build_ultrafeedback_gpt4_sft(ultrafeedback)  # the default 9,000


def test_gpt4_subset_schema_errors():
    with pytest.raises(ValueError, match="no column 'completions'"):
        build_ultrafeedback_gpt4_sft(Dataset.from_dict({"instruction": ["a"]}))
    no_model = Dataset.from_dict({"instruction": ["a"], "completions": [[{"response": "r"}]]})
    with pytest.raises(ValueError, match=r"'completions'\[\.\.\.\]\['model'\]"):
        build_ultrafeedback_gpt4_sft(no_model)


def test_gpt4_subset_skips_blank_gpt4_answers_and_duplicates():
    completions = [
        [{"model": "gpt-4", "response": "  "}, {"model": "bard", "response": "b"}],
        [{"model": "bard", "response": "b"}, {"model": "gpt-4", "response": "right"}],
        [{"model": "gpt-4", "response": "second copy"}],
    ]
    dataset = Dataset.from_dict({"instruction": ["p", "q", " q "], "completions": completions})
    subset = build_ultrafeedback_gpt4_sft(dataset, num_samples=None)
    assert subset["messages"] == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "right"}]]


# ---------------------------------------------------------------------------------------------------------------------
# The three data settings
# ---------------------------------------------------------------------------------------------------------------------


def build(setting, tulu, ultrafeedback, **kwargs):
    # Shrunk from the paper's 326k / 9,000 / 40,000 to fit the fixtures.
    kwargs = {"tulu_num_samples": 10, "gpt4_num_samples": 8, "extra_tulu_num_samples": 6, **kwargs}
    return build_sft_data(setting, tulu_source=tulu, ultrafeedback_source=ultrafeedback, **kwargs)


@pytest.mark.parametrize(
    "setting, names",
    [
        ("min", ["tulu"]),
        ("medium", ["tulu", "ultrafeedback_gpt4"]),
        ("diminished", ["tulu", "ultrafeedback_gpt4", "ultrafeedback_gpt4_plus_tulu"]),
    ],
)
def test_each_setting_returns_its_stages_in_order(setting, names, tulu, ultrafeedback):
    stages = build(setting, tulu, ultrafeedback)
    assert [stage.name for stage in stages] == names
    assert [name for name, _ in stages] == names  # stages unpack as (name, dataset)
    assert len(stages[0].dataset) == 10
    assert set(stages[0].dataset["id"]) <= set(VALID_TULU_IDS)
    if setting != "min":
        assert len(stages[1].dataset) == 8
        assert set(stages[1].dataset["prompt_text"]) <= set(GPT4_ANSWERS)
    for stage in stages:
        assert {"dataset", "id", "messages"} <= set(stage.dataset.column_names)
        assert all(messages[-1]["role"] == "assistant" for messages in stage.dataset["messages"])


def test_diminished_stage_mixes_the_same_gpt4_subset_with_unseen_tulu(tulu, ultrafeedback):
    stage1, stage2, stage3 = (stage.dataset for stage in build("diminished", tulu, ultrafeedback))
    assert len(stage3) == 8 + 6
    gpt4_part = stage3.filter(lambda row: row["dataset"] == "ultrafeedback_gpt4")
    assert sorted(gpt4_part["id"]) == sorted(stage2["id"])
    tulu_part = stage3.filter(lambda row: row["dataset"] != "ultrafeedback_gpt4")
    assert len(tulu_part) == 6
    assert not set(tulu_part["id"]) & set(stage1["id"])  # disjoint from stage 1
    assert list(stage3["id"]) != list(gpt4_part["id"]) + list(tulu_part["id"])  # shuffled, not stacked
    again = build("diminished", tulu, ultrafeedback)[2].dataset
    assert again["id"] == stage3["id"]


def test_diminished_extra_tulu_replays_the_mixture_without_ultrafeedback_prompts(tulu, ultrafeedback):
    # Stage 1 uses all of TULU (as in the paper), so the extra examples are a re-sample; the one TULU conversation
    # whose prompt is an UltraFeedback instruction is never among them.
    eligible = len(VALID_TULU_IDS) - 1
    stages = build("diminished", tulu, ultrafeedback, tulu_num_samples=None, extra_tulu_num_samples=eligible)
    tulu_part = stages[2].dataset.filter(lambda row: row["dataset"] != "ultrafeedback_gpt4")
    assert set(tulu_part["id"]) == set(VALID_TULU_IDS) - {"wizardlm_2"}
    assert len(stages[0].dataset) == len(VALID_TULU_IDS)
    with pytest.raises(ValueError, match="Asked for"):
        build("diminished", tulu, ultrafeedback, tulu_num_samples=None, extra_tulu_num_samples=eligible + 1)


def test_unknown_setting_lists_the_valid_ones(tulu, ultrafeedback):
    with pytest.raises(ValueError, match="'min', 'medium', 'diminished'"):
        build_sft_data("maximum", tulu_source=tulu, ultrafeedback_source=ultrafeedback)
    assert SETTINGS == ("min", "medium", "diminished")


def test_stages_render_with_a_chat_template(tulu, ultrafeedback):
    from srppo_trl.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for stage in build("diminished", tulu, ultrafeedback):
        text = tokenizer.apply_chat_template(stage.dataset[0]["messages"], tokenize=False)
        assert stage.dataset[0]["messages"][-1]["content"] in text


def test_hub_field_order_is_normalised_so_stages_concatenate(ultrafeedback):
    # Parquet files on the hub may store each message as {content, role}: the builders must still concatenate.
    rows = [
        {
            "dataset": "lima",
            "id": f"lima_{i}",
            "messages": [{"content": f"q{i}", "role": "user"}, {"content": "a", "role": "assistant"}],
        }
        for i in range(12)
    ]
    tulu = Dataset.from_list(rows)
    assert list(tulu.features["messages"].feature) == ["content", "role"]
    stages = build("diminished", tulu, ultrafeedback, tulu_num_samples=4, extra_tulu_num_samples=8)
    assert stages[2].dataset.features == data.SFT_FEATURES
    assert len(stages[2].dataset) == 8 + 8


# ---- checks of a stage's data before training (the pipeline runs them before SFT) ----


def test_check_sft_data_refuses_what_sft_cannot_train_on():
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data.check_sft_data(Dataset.from_dict({"messages": [good]}), "SFT stage 0")
    with pytest.raises(ValueError, match="has no column 'messages'"):
        data.check_sft_data(Dataset.from_dict({"text": ["Hi"]}), "SFT stage 0")
    with pytest.raises(ValueError, match="SFT stage 0 dataset is empty"):
        data.check_sft_data(Dataset.from_dict({"messages": [good]}).select([]), "SFT stage 0")
    with pytest.raises(
        ValueError, match=r"1 unusable conversation\(s\) \(1 not ending with an assistant turn; .* row 1"
    ):
        data.check_sft_data(Dataset.from_dict({"messages": [good, good[:1]]}), "SFT stage 0")


def test_check_prompt_lengths_counts_tokens_as_the_trainer_does():
    from types import SimpleNamespace

    from srppo_trl.testing import tiny_tokenizer
    from srppo_trl.trainer.srppo_trainer import SRPPOTrainer

    tokenizer = tiny_tokenizer()
    prompts = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "word " * 40}]]}
    )
    lengths = data.check_prompt_lengths(
        prompts, tokenizer, max_prompt_length=None, response_length=8, context=None, name="train_dataset"
    )
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=None, n_positions=None))
    args = SimpleNamespace(max_prompt_length=None, response_length=8)
    assert lengths == SRPPOTrainer._prepare_dataset(prompts, tokenizer, model, args, "train_dataset")["prompt_length"]
    assert data.prompt_input_ids("plain text", tokenizer) == tokenizer("plain text")["input_ids"]

    short, long = lengths
    assert short < long
    with pytest.raises(ValueError, match=rf"1 prompt\(s\) in train_dataset are longer than max_prompt_length={short}"):
        data.check_prompt_lengths(
            prompts, tokenizer, max_prompt_length=short, response_length=8, context=None, name="train_dataset"
        )
    data.check_prompt_lengths(
        prompts, tokenizer, max_prompt_length=long, response_length=8, context=long + 8, name="x"
    )
    with pytest.raises(ValueError, match=f"plus response_length=8 exceeds the model's context of {long + 7} tokens"):
        data.check_prompt_lengths(
            prompts, tokenizer, max_prompt_length=None, response_length=8, context=long + 7, name="train_dataset"
        )
    with pytest.raises(ValueError, match="has neither an `input_ids` nor a `prompt` column"):
        data.check_prompt_lengths(
            prompts.rename_column("prompt", "query"), tokenizer, max_prompt_length=None, response_length=8,
            context=None, name="train_dataset",
        )  # fmt: skip
    with pytest.raises(ValueError, match="x is empty: it needs at least one prompt"):
        data.check_prompt_lengths(
            prompts.select([]), tokenizer, max_prompt_length=None, response_length=8, context=None, name="x"
        )
