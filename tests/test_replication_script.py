"""scripts/small_replication.py: the resumable grid (skips, reruns, time limit, commits) and the report from raw files."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "small_replication.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("small_replication", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_argv(tiny_base, tmp_path, *extra):
    return [
        "--output", str(tmp_path / "outputs"), "--raw-dir", str(tmp_path / "raw"), "--base-model", str(tiny_base),
        "--seeds", "0", "--sft-max-steps", "1", "--extended-epochs", "1", "--num-prompts", "8", "--rollout-batch", "4",
        "--mini-batch", "2", "--ppo-epochs", "1", "--critic-warmup", "1", "--grpo-num-generations", "2",
        "--response-length", "4", "--max-prompt-length", "400", "--eval-n", "2", "--eval-arithmetic", "2",
        "--eval-max-new-tokens", "4", "--eval-batch-size", "2", "--sample-prompts", "2", "--sample-n", "2",
        "--spin-max-new-tokens", "4", "--spin-batch-size", "2", "--precision", "fp32", *extra,
    ]  # fmt: skip


def test_run_grid_skips_done_cells_and_stops_between_cells(script):
    """A fake clock: each cell takes 10 minutes; finished cells cost nothing and are never rerun."""
    now = [0.0]
    ran = []

    def run_cell(cell):
        ran.append(cell)
        now[0] += 600

    cells = script.grid_cells(["base", "sft", "srppo"], [0, 1])
    assert cells == [("base", None), ("sft", 0), ("srppo", 0), ("sft", 1), ("srppo", 1)]
    done = {("sft", 0)}
    result = script.run_grid(cells, done.__contains__, run_cell, max_minutes=25, clock=lambda: now[0], log=lambda m: 0)
    # No estimate: a cell starts while under 25 minutes (0, 10, 20), the fourth would start at 30.
    assert ran == [("base", None), ("srppo", 0), ("sft", 1)] and result["skipped"] == [("sft", 0)]
    assert result["stopped_before"] == ("srppo", 1)
    ran.clear()
    result = script.run_grid(
        cells, done.__contains__, run_cell, max_minutes=25, estimate_s=lambda cell: 600, clock=lambda: now[0]
    )
    # Estimated 10 minutes each: the third would end at 30 > 25, so it never starts.
    assert ran == [("base", None), ("srppo", 0)] and result["stopped_before"] == ("sft", 1)
    assert script.run_grid(cells, lambda c: False, run_cell, max_minutes=0)["ran"] == []
    ran.clear()
    result = script.run_grid(cells, lambda c: False, run_cell, blocked=lambda c: "elsewhere" * (c[0] == "srppo"))
    assert ran == [("base", None), ("sft", 0), ("sft", 1)] and result["blocked"] == [("srppo", 0), ("srppo", 1)]


def test_cell_config_hash_covers_only_what_the_arm_depends_on(script):
    args = script.parse([])
    changed = script.parse(["--actor-lr", "1e-4"])
    for arm in script.ARMS:
        same = script.config_hash(script.cell_config(args, arm, 0)) == script.config_hash(
            script.cell_config(changed, arm, 0)
        )
        assert same == (arm in ("base", "sft", "sft_extended")), arm
    assert script.cell_config(args, "srppo", 0) != script.cell_config(args, "srppo", 1)  # seeds are cells
    with pytest.raises(SystemExit, match="multiple of --mini-batch"):
        script.parse(["--rollout-batch", "6", "--mini-batch", "4"])


def test_commit_cell_commits_only_that_file(script, tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git[:1], "-C", str(tmp_path), "config", "user.name", "t"], check=True)
    subprocess.run([*git[:1], "-C", str(tmp_path), "config", "user.email", "t@t"], check=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "sft_seed0.json").write_text("{}")
    (tmp_path / "other.txt").write_text("not mine")
    subprocess.run(["git", "-C", str(tmp_path), "add", "other.txt"], check=True)  # staged by someone else
    script.commit_cell(raw / "sft_seed0.json", "Replication cell sft_seed0")
    files = subprocess.run(
        ["git", "-C", str(tmp_path), "show", "--name-only", "--format=%s", "HEAD"], capture_output=True, text=True
    ).stdout.split()
    assert files[-1] == "raw/sft_seed0.json" and "other.txt" not in files


def test_a_commit_that_keeps_failing_is_reported_not_raised(script, tmp_path, capsys):
    """The campaign goes on when git cannot commit (here: a lock file held by another git command)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".git" / "index.lock").write_text("")
    (tmp_path / "base.json").write_text("{}")
    script.commit_cell(tmp_path / "base.json", "Replication cell base", tries=2, wait_s=0.0)
    assert "could not commit" in capsys.readouterr().out


def test_grid_end_to_end_skips_reruns_on_change_and_reports_from_raw_files(script, tiny_base, tmp_path):
    argv = tiny_argv(tiny_base, tmp_path)
    first = script.main(argv)
    assert [c[0] for c in first["ran"]] == ["base", "sft", "srppo", "grpo", "spin", "sft_extended"]
    raw = tmp_path / "raw"
    cell = json.loads((raw / "srppo_seed0.json").read_text())
    assert cell["arm"] == "srppo" and cell["seed"] == 0 and cell["config"]["actor_lr"] == 2e-5
    assert (
        len(cell["per_prompt"]["held_out/inst_loose_acc"]) == 2
        and len(cell["per_prompt"]["arithmetic/exact_match"]) == 2
    )
    assert len(cell["per_prompt"]["samples/coherent_reward"]) == 2 and "samples/kl_to_sft" in cell["summary"]
    assert cell["machine"]["torch_threads"] >= 1 and "load_avg_end" in cell["machine"]
    grpo, spin = (json.loads((raw / f"{arm}_seed0.json").read_text()) for arm in ("grpo", "spin"))
    # Their budget is SRPPO's stage time in CPU seconds (the default --budget-clock), which they then spend.
    assert grpo["training"]["budget_s"] == cell["training"]["stage_cpu_s"] == spin["training"]["budget_s"]
    assert grpo["training"]["budget_clock"] == "cpu" and grpo["training"]["stage_cpu_s"] > 0
    assert "samples/coherent_reward" not in json.loads((raw / "base.json").read_text())["per_prompt"]

    again = script.main(argv)  # nothing left to do
    assert again["ran"] == [] and len(again["skipped"]) == len(script.ARMS)
    sft_model = tmp_path / "outputs" / "seed0" / "sft" / "sft" / "model.safetensors"
    mtime = sft_model.stat().st_mtime_ns
    changed = script.main(tiny_argv(tiny_base, tmp_path, "--actor-lr", "1e-4"))
    assert [c[0] for c in changed["ran"]] == ["srppo", "grpo", "spin"]  # the SFT model and cells are reused
    assert sft_model.stat().st_mtime_ns == mtime
    assert json.loads((raw / "srppo_seed0.json").read_text())["config"]["actor_lr"] == 1e-4

    # SPIN's budget is SRPPO's stage time: an SRPPO cell from another class of machine leaves SPIN for another run.
    srppo = json.loads((raw / "srppo_seed0.json").read_text())
    assert srppo["precision"] == "fp32" and srppo["machine_class"].startswith("fp32/")
    srppo["machine_class"] = "bf16/amx_bf16" if srppo["machine_class"] != "bf16/amx_bf16" else "fp32/avx2"
    (raw / "srppo_seed0.json").write_text(json.dumps(srppo))
    elsewhere = script.main(tiny_argv(tiny_base, tmp_path, "--actor-lr", "1e-4", "--spin-lr", "1e-6"))
    assert elsewhere["ran"] == [] and elsewhere["blocked"] == [("spin", 0)]

    # The report needs the raw files only: copy them away from the models.
    alone = tmp_path / "alone"
    shutil.copytree(raw, alone / "raw")
    shutil.rmtree(tmp_path / "outputs")
    md, png = alone / "replication.md", alone / "replication" / "replication.png"
    script.main(["--report", "--raw-dir", str(alone / "raw"), "--report-md", str(md), "--report-png", str(png)])
    text = md.read_text()
    assert png.stat().st_size > 0
    for label in ("| SRPPO | 1 |", "| SFT (Extended) | 1 |", "| GRPO | 1 |", "| SPIN | 1 |", "| Base | 1 |"):
        assert label in text
    for diff in ("SRPPO - SFT |", "SRPPO - SFT (Extended) |", "SRPPO - GRPO |", "SRPPO - SPIN |"):
        assert diff in text
    assert "## Cost of each cell" in text and "| srppo_seed0 |" in text and "## Machine" in text
    assert "## SRPPO's critic" in text and "| 0 | 1 | 1 |" in text  # 1 warm-up buffer, then 1 actor buffer
    assert "at this scale" not in text  # 3 seeds expected by default: incomplete, so no verdict
    complete = ["--report", "--seeds", "0", "--raw-dir", str(alone / "raw"), "--report-md", str(md)]
    script.main([*complete, "--report-png", str(png)])
    assert "at this scale" in md.read_text() and "Incomplete" not in md.read_text()
    # A campaign still running says how far it is, and decides nothing.
    (alone / "raw" / "spin_seed0.json").unlink()
    one_seed = ["--report", "--seeds", "0", "--raw-dir", str(alone / "raw"), "--report-md", str(md)]
    script.main([*one_seed, "--report-png", str(png)])
    assert "**Incomplete: 5 of 6 cells are in**" in md.read_text()
    assert re.search(r"\| 0 \| 1 \| 1 \| \d+\.\d\d / [+-]\d+\.\d\d / \d+\.\d\d \|", text)  # error / bias / spread


def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(script, monkeypatch):
    import srppo_trl.trainer.precision

    monkeypatch.setattr(srppo_trl.trainer.precision, "cpu_has_fast_bf16", lambda: True)
    assert script.resolve_precision("auto") == "bf16" and script.resolve_precision("fp32") == "fp32"
    monkeypatch.setattr(srppo_trl.trainer.precision, "cpu_has_fast_bf16", lambda: False)
    assert script.resolve_precision("auto") == "fp32" and script.resolve_precision("bf16") == "bf16"
    assert script.machine_class("bf16", ["avx2", "avx512_bf16", "avx512f", "amx_bf16"]) == "bf16/amx_bf16"
    assert script.machine_class("fp32", ["avx", "avx2", "fma"]) == "fp32/avx2"


def test_max_minutes_zero_runs_no_cell(script, tiny_base, tmp_path):
    result = script.main(tiny_argv(tiny_base, tmp_path, "--max-minutes", "0", "--arms", "base"))
    assert result["ran"] == [] and result["stopped_before"] == ("base", None)
    assert not (tmp_path / "raw").exists()


def test_time_estimates_come_from_the_same_arm_only(script, tmp_path):
    for name, seconds in (("sft_seed0", 100.0), ("sft_extended_seed0", 900.0), ("srppo_seed1", 300.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"timings": {"total_s": seconds}}))
    assert script.longest_recorded_s(tmp_path, "sft") == 100.0  # not sft_extended's
    assert script.longest_recorded_s(tmp_path, "grpo") == 0.0
    assert script.longest_recorded_s(tmp_path, None) == 900.0


def test_report_quotes_the_budget_check_of_the_greedy_benchmark(script, tmp_path):
    assert "not measured" in " ".join(script.budget_check_section(tmp_path / "missing.txt"))
    output = tmp_path / "results" / "budget.txt"
    output.parent.mkdir()
    budget = {"seed0/srppo": {"256": 0.281, "768": 0.281}, "seed0/sft": {"128": 0.188, "256": 0.156, "768": 0.156}}
    output.write_text("generate, batch 16: 1.0 s\n" + json.dumps({"speed": {}, "budget": budget}) + "\n")
    lines = script.budget_check_section(output, tmp_path / "docs")
    assert "| model | 128 tokens | 256 tokens | 768 tokens |" in lines
    assert "| `seed0/srppo` | - | 0.281 | 0.281 |" in lines and "| `seed0/sft` | 0.188 | 0.156 | 0.156 |" in lines
    assert any("(../results/budget.txt)" in line for line in lines)


def test_sample_scores_are_the_coherent_reward_and_the_kl_of_the_sampled_responses(script):
    import torch

    from srppo_trl import CoherentRewardModel
    from srppo_trl.models.logprobs import sequence_logprobs
    from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=3)
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    seen = []
    base_log_probs = reward.base_log_probs
    reward.base_log_probs = lambda *batch: seen.append(batch) or base_log_probs(*batch)
    prompts = [[{"role": "user", "content": text}] for text in ("Say hi.", "Name a colour.", "Count to three.")]
    columns = script.sample_scores(policy, reward, tokenizer, prompts, 2, 5, seed=0, chunk_prompts=2)
    reward.base_log_probs = base_log_probs  # stop recording before recomputing from the recorded batches
    assert len(seen) == 2 and all(len(values) == 3 for values in columns.values())
    expected_reward = torch.cat([reward(*batch).view(-1, 2).mean(-1) for batch in seen])
    expected_kl = torch.cat(
        [
            (sequence_logprobs(policy, *batch) - reward.sft_log_probs(*batch)).sum(-1).view(-1, 2).mean(-1)
            for batch in seen
        ]
    )
    assert columns["coherent_reward"] == expected_reward.tolist()
    assert columns["kl_to_sft"] == expected_kl.tolist()
    assert all(0 < n <= 5 for n in columns["length"]) and all(0 <= r <= 1 for r in columns["eos_rate"])


def _cells_with_held_out(script, scores: dict) -> dict:
    """Cells of seeds 0-2 whose held-out and in-domain L.Acc per prompt are `scores[arm]` (plus per-prompt noise)."""
    cells = {}
    for arm, value in scores.items():
        for seed in range(3):
            per_prompt = {
                metric: [value + 0.01 * ((i * 7 + seed) % 5 - 2) for i in range(40)]
                for metric in ("held_out/inst_loose_acc", "in_domain/inst_loose_acc", "samples/coherent_reward")
            }
            cells.setdefault(arm, {})[seed] = {"per_prompt": per_prompt}
    return cells


@pytest.mark.parametrize(
    ("srppo", "expected"),
    [
        (0.6, "**The claim's central part holds"),
        (0.3, "**The claim does not hold"),
        (0.5, "**The claim is not confirmed"),
    ],
)
def test_the_verdict_follows_the_held_out_interval_against_sft(script, srppo, expected):
    scores = {"sft": 0.5, "srppo": srppo, "sft_extended": 0.5, "grpo": srppo, "spin": 0.4}
    lines = script.claim_verdict(_cells_with_held_out(script, scores))
    assert lines[0].startswith(expected)
    text = "\n".join(lines)
    assert "SRPPO - SPIN: held-out L.Acc " + ("higher" if srppo > 0.4 else "lower") in text
    assert "SRPPO - GRPO: held-out L.Acc not resolved" in text
    assert script.claim_verdict({})[0].startswith("No verdict")


def test_srppo_cells_train_as_the_committed_ones_did(script, tmp_path):
    """The committed cells ran before bf16 CPU runs took the attention backward in fp32 and before rollouts drew
    tokens by inverse transform: a cell run now must do neither."""
    from types import SimpleNamespace

    args = script.Campaign.trainer_args(SimpleNamespace(precision="fp32"), tmp_path, seed=0)
    assert args.cpu_attention_fp32_backward is False
    assert args.rollout_sampler == "multinomial"
