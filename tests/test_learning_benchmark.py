"""benchmarks/learning.py end to end on tiny local models with a budget of about a second per trainer."""

import importlib.util
import json
import re
from pathlib import Path

from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("learning_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_benchmark_records_rows_for_every_trainer_and_reward(tiny_base, tmp_path):
    sft = tmp_path / "sft"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    out = tmp_path / "learning"
    argv = [
        "--base-model", str(tiny_base), "--sft-model", str(sft), "--output-dir", str(out), "--budget-min", "0.02",
        "--eval-every-s", "0.5", "--eval-prompts", "2", "--train-prompts", "16", "--max-new-tokens", "4",
        "--samples-per-step", "4", "--num-generations", "2", "--critic-warmup", "1", "--threads", "1",
        "--max-prompt-tokens", "400", "--word", "the",
    ]  # fmt: skip
    result = _load_script().main(argv)

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["rewards"]) == {"scripted", "coherent"}
    for reward in ("scripted", "coherent"):
        runs = saved["rewards"][reward]["runs"]
        assert set(runs) == {"srppo", "grpo", "rloo"}
        for run in runs.values():
            assert run["steps"] >= 1
            assert len(run["rows"]) >= 2 and run["rows"][0]["step"] == 0 and run["rows"][-1]["step"] == run["steps"]
            assert all({"wall_s", "reward", "kl", "length", "eos_rate"} <= set(row) for row in run["rows"])
            assert run["rows"][0]["kl"] == 0.0  # the start model against itself
    assert "word_rate" in saved["rewards"]["scripted"]["runs"]["grpo"]["rows"][0]
    # SRPPO's critic against the returns' spread, per logged buffer; trainers without a critic have none.
    critic = saved["rewards"]["coherent"]["runs"]["srppo"]["critic_rows"]
    assert critic and all(row["abs_error"] >= 0 and row["returns_spread"] >= 0 for row in critic)
    assert saved["rewards"]["coherent"]["runs"]["grpo"]["critic_rows"] == []
    table = (out / "results.md").read_text()
    assert re.search(r"\| coherent \| srppo \|.* \d+\.\d\d / \d+\.\d\d \|", table)
    assert re.search(r"\| coherent \| grpo \|.* - \|", table)
    assert (out / "learning.png").stat().st_size > 0
    assert "| coherent | rloo |" in (out / "results.md").read_text()
    assert result["machine"]["torch_threads"] == 1

    # --report merges saved runs (here the same file twice, as two halves of a split run would be) into one table.
    merged = tmp_path / "merged"
    table = _load_script().report([str(out / "results.json")] * 2, str(merged))
    assert table.count("| scripted |") == 3 and (merged / "learning.png").stat().st_size > 0


def test_srppo_critic_options_reach_the_srppo_arm(tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    from srppo_trl import CoherentRewardModel

    start = tmp_path / "start"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(start)
    tokenizer.save_pretrained(start)
    module = _load_script()
    argv = ["--output-dir", str(tmp_path), "--normalize-reward", "--value-bias-init", "--critic-warmup", "5"]
    args = module.parse_args(argv + ["--samples-per-step", "4"])
    reward = CoherentRewardModel(tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=2))
    prompts = Dataset.from_dict({"prompt": [f"What is {i} plus {i}?" for i in range(4)]})
    callback = TrainerCallback()
    trainer = module.build_trainer("srppo", args, str(start), reward, None, None, tokenizer, prompts, callback)
    assert (trainer.args.normalize_reward, trainer.args.value_bias_init) == (True, True)
    assert trainer.args.critic_warmup_steps == 5
    defaults = module.parse_args(["--output-dir", str(tmp_path)])
    assert (defaults.normalize_reward, defaults.value_bias_init) == (False, False)  # opt-in


def test_sft_only_trains_the_start_model_with_the_demo_sft_settings(tiny_base, tmp_path):
    argv = ["--sft-only", "--base-model", str(tiny_base), "--output-dir", str(tmp_path), "--sft-max-steps", "1"]
    result = _load_script().main(argv + ["--threads", "1"])
    assert Path(result["sft_model"]) == tmp_path / "sft"
    assert (tmp_path / "sft" / "model.safetensors").is_file()


def test_the_budget_counts_the_chosen_clock_without_the_evaluations():
    """A fake clock: training stops at the first step past the budget; evaluation time is not counted."""
    from types import SimpleNamespace

    now = [100.0]

    def evaluate(policy):
        now[0] += 50.0  # an evaluation takes 50 s of the clock
        return {"reward": 0.0, "kl": 0.0, "length": 1.0, "eos_rate": 1.0}

    callback = _load_script().WallClockBudget(30.0, 20.0, evaluate, {"reward": 0.0}, "test", clock=lambda: now[0])
    callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=None)
    callback.on_train_begin(None, None, None)
    step, control = 0, SimpleNamespace(should_training_stop=False)
    while not control.should_training_stop and step < 10:
        step += 1
        now[0] += 10.0  # a step takes 10 s
        callback.on_step_end(None, SimpleNamespace(global_step=step), control)
    # 10 s per step: an evaluation after step 2 (20 s), the budget reached at step 3 (30 s: evaluations excluded).
    assert step == 3 and [row["step"] for row in callback.rows] == [0, 2, 3]
    assert callback.train_seconds() == 30.0 and callback.eval_s == 100.0


def test_every_trainer_trains_in_bf16_on_a_cpu(tiny_base, tmp_path, cpu_bf16):
    """TRL's GRPO/RLOO configs refuse bf16 on a CPU unless `use_cpu` is set: the benchmark sets it for every trainer."""
    sft = tmp_path / "sft"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=1).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    argv = [
        "--base-model", str(tiny_base), "--sft-model", str(sft), "--output-dir", str(tmp_path / "out"),
        "--budget-min", "0.005", "--eval-every-s", "60", "--eval-prompts", "2", "--train-prompts", "8",
        "--max-new-tokens", "4", "--samples-per-step", "4", "--num-generations", "2", "--critic-warmup", "0",
        "--threads", "1", "--max-prompt-tokens", "400", "--reward", "coherent", "--precision", "bf16",
    ]  # fmt: skip
    runs = _load_script().main(argv)["rewards"]["coherent"]["runs"]
    assert set(runs) == {"srppo", "grpo", "rloo"} and all(run["steps"] >= 1 for run in runs.values())
