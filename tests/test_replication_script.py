"""scripts/small_replication.py end to end on a tiny model: every arm is trained, scored and tabled."""

import json
import runpy
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "small_replication.py"


def test_replication_script_runs_every_arm_and_aggregates_over_seeds(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "replication"
    argv = [
        str(SCRIPT), "--output", str(out), "--base-model", str(tiny_base), "--seeds", "0", "1",
        "--sft-max-steps", "1", "--num-prompts", "8", "--rollout-batch", "4", "--response-length", "4",
        "--max-prompt-length", "400", "--critic-warmup", "0", "--eval-n", "1", "--eval-prompts", "2",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")

    result = json.loads((out / "replication.json").read_text())
    arms = {"base", "sft", "sft_extended", "srppo_sequence", "srppo_token", "sft_samples"}
    assert set(result["per_seed"]) == arms
    for arm in ("srppo_sequence", "srppo_token", "sft_samples"):
        assert len(result["per_seed"][arm]) == 2  # one row per seed
    for arm in ("base", "sft", "sft_extended"):
        assert len(result["per_seed"][arm]) == 1  # trained / scored once
    held_out = result["summary"]["srppo_sequence"]["held_out/inst_loose_acc"]
    assert held_out["n"] == 2 and 0.0 <= held_out["mean"] <= 1.0 and held_out["std"] >= 0.0
    assert "samples/objective/coherent_reward" in result["summary"]["srppo_token"]
    table = (out / "replication.md").read_text().splitlines()
    assert table[0].startswith("| arm |") and len(table) == 2 + len(arms)
    assert any(line.startswith("| srppo_token |") and "±" in line for line in table)


def test_replication_script_reuses_an_earlier_runs_sft_models(tiny_base, tmp_path, monkeypatch):
    common = [
        "--base-model", str(tiny_base), "--seeds", "0", "--sft-max-steps", "1", "--num-prompts", "4",
        "--rollout-batch", "4", "--response-length", "4", "--max-prompt-length", "400", "--critic-warmup", "0",
        "--eval-n", "1", "--eval-prompts", "2",
    ]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--output", str(first), *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--output", str(second), "--reuse-sft", str(first), *common])
    runpy.run_path(str(SCRIPT), run_name="__main__")

    assert not (second / "sft").exists() and not (second / "sft_extended").exists()  # nothing trained again
    a, b = (json.loads((d / "replication.json").read_text())["per_seed"] for d in (first, second))
    assert b["sft"] == a["sft"] and b["sft_extended"] == a["sft_extended"]  # the same models, greedy evaluation

    monkeypatch.setattr(
        sys, "argv", [str(SCRIPT), "--output", str(tmp_path / "x"), "--reuse-sft", str(tmp_path), *common]
    )
    with pytest.raises(FileNotFoundError, match="no model in"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
