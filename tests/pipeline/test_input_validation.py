"""Bad input, as a new user meets it: `--help` of every script, a value outside its field's range, a missing `--config`.
Each is refused with one sentence before any model is loaded.
"""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srppo_trl.pipeline.run import PIPELINE_FIELD_RANGES, PipelineArguments, main
from srppo_trl.trainer import ppo_math
from srppo_trl.trainer.config import FIELD_RANGES, SRPPOConfig
from srppo_trl.trainer.field_ranges import Range, choice_fields


ROOT = Path(__file__).parents[2]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.py"))
CLI_MODULE = "srppo_trl.pipeline"  # the `srppo` console script is its `main`

# Runs `<target> --help` for each target in one Python (one import of TRL instead of one per script).
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
codes = {}
for target in sys.argv[1:]:
    sys.argv = [target, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        codes[target] = "returned without exiting"
    except SystemExit as exit:
        codes[target] = exit.code
    except Exception as error:
        codes[target] = repr(error)
print("RESULT " + json.dumps(codes))
"""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def test_help_of_every_recipe_and_of_the_cli_exits_0():
    assert len(RECIPES) >= 9, RECIPES
    proc = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, CLI_MODULE, *RECIPES],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    codes = json.loads(lines[-1][len("RESULT ") :])
    assert codes == {target: 0 for target in [CLI_MODULE, *RECIPES]}


def test_a_missing_config_file_is_one_sentence_and_a_non_zero_exit(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", CLI_MODULE, "--config", str(tmp_path / "missing.yaml")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"error: --config {tmp_path / 'missing.yaml'}: no such file (give the path of a recipe's YAML file)."
    )


@pytest.mark.parametrize(
    "content, message",
    [(None, "--config needs the path of a YAML file"), ("a: [1", "is not a readable YAML file"), ("- 1", "mapping")],
    ids=["no-path", "broken-yaml", "not-a-mapping"],
)
def test_a_config_that_is_not_a_yaml_mapping_is_one_sentence(tmp_path, content, message):
    argv = ["--config"]
    if content is not None:
        (tmp_path / "x.yaml").write_text(content)
        argv.append(str(tmp_path / "x.yaml"))
    with pytest.raises(SystemExit, match=message):
        main(argv)


# ---------------------------------------------------------------------------------------------- field ranges


def _numeric_fields(cls) -> set[str]:
    """The fields `cls` itself declares with an int or float type (optional or not)."""
    own = cls.__dict__.get("__annotations__", {})
    numeric = set()
    for f in dataclasses.fields(cls):
        kinds = {part.strip() for part in str(f.type).split("|")}
        if f.name in own and kinds & {"int", "float"}:
            numeric.add(f.name)
    return numeric


# Numeric fields with no range to check: derived in `__post_init__` (TRL 1.12's names), or TrainingArguments' own
# (checked by transformers).
DERIVED = {
    "world_size", "num_total_batches", "micro_batch_size", "local_batch_size", "batch_size", "local_mini_batch_size",
    "mini_batch_size", "steps_per_rollout", "logging_steps",
}  # fmt: skip


@pytest.mark.parametrize(
    "cls, ranges, exempt", [(SRPPOConfig, FIELD_RANGES, DERIVED), (PipelineArguments, PIPELINE_FIELD_RANGES, set())]
)
def test_every_numeric_field_has_a_range(cls, ranges, exempt):
    assert _numeric_fields(cls) - exempt <= set(ranges), "a numeric field without a range: add it to the table"
    assert set(ranges) <= {f.name for f in dataclasses.fields(cls)}


def _outside(valid: Range) -> list:
    """Values just outside `valid`."""
    values = [float("nan")]
    if valid.low is not None:
        values.append(valid.low if valid.low_open else valid.low - 1)
    if valid.high is not None:
        values.append(valid.high if valid.high_open else valid.high + 1)
    if not valid.none_ok:
        values.append(None)
    return [v for v in values if v not in valid.also]


CONFIG_CASES = [(name, value) for name, valid in FIELD_RANGES.items() for value in _outside(valid)]
PIPELINE_CASES = [(name, value) for name, valid in PIPELINE_FIELD_RANGES.items() for value in _outside(valid)]


@pytest.mark.parametrize("name, value", CONFIG_CASES, ids=[f"{n}={v}" for n, v in CONFIG_CASES])
def test_srppo_config_refuses_a_value_outside_its_range(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value!r}\.$"):
        SRPPOConfig(output_dir=str(tmp_path), **{name: value})


@pytest.mark.parametrize("name, value", PIPELINE_CASES, ids=[f"{n}={v}" for n, v in PIPELINE_CASES])
def test_pipeline_arguments_refuse_a_value_outside_its_range(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value!r}\.$"):
        PipelineArguments(**{name: value})


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("kl_coef", -1.0, "kl_coef must be >= 0, got -1.0."),
        ("cliprange", 0.0, "cliprange must be > 0, got 0.0."),
        ("cliprange_value", -0.2, "cliprange_value must be > 0 or None (no value clipping), got -0.2."),
        ("lam", 1.5, "lam must be in [0, 1], got 1.5."),
        ("gamma", 0.0, "gamma must be in (0, 1], got 0.0."),
        ("temperature", 0.0, "temperature must be > 0, got 0.0."),
        ("learning_rate", -3e-6, "learning_rate must be > 0, got -3e-06."),
        (
            "critic_learning_rate",
            0.0,
            "critic_learning_rate must be > 0 or None (the policy's learning rate), got 0.0.",
        ),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0."),
        ("num_ppo_epochs", 0, "num_ppo_epochs must be >= 1, got 0."),
    ],
)
def test_the_sentence_names_the_field_its_value_and_its_range(tmp_path, name, value, message):
    with pytest.raises(ValueError) as error:
        SRPPOConfig(output_dir=str(tmp_path), **{name: value})
    assert str(error.value) == message


def test_values_on_the_edge_of_their_range_are_accepted(tmp_path):
    SRPPOConfig(
        output_dir=str(tmp_path), kl_coef=0.0, lam=0.0, gamma=1.0, top_k=0, top_p=1.0, cliprange_value=None,
        critic_learning_rate=None, critic_warmup_steps=0, missing_eos_penalty=0.0, num_sample_generations=0,
    )  # fmt: skip
    SRPPOConfig(output_dir=str(tmp_path), lam=1.0)
    PipelineArguments(sft_max_steps=-1, eval_num_prompts=0, eval_num_samples=0, num_prompts=None)
    with pytest.raises(ValueError, match=r"sft_max_steps must be >= 1 or -1 \(by epochs\), got 0\."):
        PipelineArguments(sft_max_steps=0)


# ------------------------------------------------------------------ string fields with a fixed set of values (Literal)
CHOICES = {
    SRPPOConfig: {
        "kl_estimator": ("k1", "k3"),
        "reward_granularity": ("sequence", "token"),
        "stop_token": ("eos", None),
        "vllm_mode": ("colocate", "server"),
        "vllm_model_impl": ("vllm", "transformers"),
        "rollout_sampler": ("inverse_cdf", "multinomial"),
    },
    PipelineArguments: {
        "setting": ("demo", "min", "medium", "diminished"),
        "algorithm": ("ppo", "grpo", "rloo", "spin"),
    },
}


@pytest.mark.parametrize("cls", list(CHOICES))
def test_string_options_are_literal_fields(cls):
    assert choice_fields(cls) == CHOICES[cls]


def test_the_kl_estimator_choices_are_the_ones_ppo_math_implements():
    assert set(choice_fields(SRPPOConfig)["kl_estimator"]) == set(ppo_math.KL_ESTIMATORS)


def test_help_lists_the_choices_of_every_string_option():
    from srppo_trl.pipeline import parse_args

    with pytest.raises(SystemExit) as exit, contextlib.redirect_stdout(io.StringIO()) as out:
        parse_args(["--help"])
    assert exit.value.code == 0
    help_text = " ".join(out.getvalue().split())
    for choices in CHOICES.values():
        for name, values in choices.items():
            assert f"--{name} {{{','.join(str(v) for v in values)}}}" in help_text, name


@pytest.mark.parametrize("name", ["kl_estimator", "reward_granularity", "stop_token", "vllm_mode", "setting"])
def test_the_command_line_refuses_a_value_outside_the_choices(name, tmp_path):
    from srppo_trl.pipeline import parse_args

    with pytest.raises(SystemExit) as exit, contextlib.redirect_stderr(io.StringIO()) as err:
        parse_args(["--output_dir", str(tmp_path), f"--{name}", "k9"])
    assert exit.value.code == 2
    assert f"argument --{name}" in err.getvalue() and "invalid choice: 'k9'" in err.getvalue()


def test_the_command_line_accepts_a_choice_and_none(tmp_path):
    from srppo_trl.pipeline import parse_args

    pipe, args, _ = parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--kl_estimator", "k3", "--stop_token", "None",
         "--algorithm", "grpo"]
    )  # fmt: skip
    assert (args.kl_estimator, args.stop_token, pipe.algorithm) == ("k3", None, "grpo")


@pytest.mark.parametrize(
    "cls, name, value, message",
    [
        (SRPPOConfig, "kl_estimator", "k9", "kl_estimator must be 'k1' or 'k3', got 'k9'."),
        (SRPPOConfig, "reward_granularity", "word", "reward_granularity must be 'sequence' or 'token', got 'word'."),
        (SRPPOConfig, "stop_token", "</s>", "stop_token must be 'eos' or None, got '</s>'."),
        (SRPPOConfig, "vllm_mode", "remote", "vllm_mode must be 'colocate' or 'server', got 'remote'."),
        (SRPPOConfig, "vllm_model_impl", "hf", "vllm_model_impl must be 'vllm' or 'transformers', got 'hf'."),
        (PipelineArguments, "setting", "max", "setting must be 'demo', 'min', 'medium' or 'diminished', got 'max'."),
        (PipelineArguments, "algorithm", "dpo", "algorithm must be 'ppo', 'grpo', 'rloo' or 'spin', got 'dpo'."),
    ],
)
def test_a_value_outside_the_choices_given_in_python_is_one_sentence(cls, name, value, message, tmp_path):
    kwargs = {"output_dir": str(tmp_path)} if cls is SRPPOConfig else {}
    with pytest.raises(ValueError) as error:
        cls(**kwargs, **{name: value})
    assert str(error.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        (["--kl_coef", "-1"], r"kl_coef must be >= 0, got -1\.0\."),
        (["--lam", "2"], r"lam must be in \[0, 1\], got 2\.0\."),
        (["--num_prompts", "0"], r"num_prompts must be >= 1 or None \(all\), got 0\."),
    ],
)
def test_the_command_line_refuses_an_out_of_range_value_before_anything_is_loaded(
    override, message, tmp_path, monkeypatch
):
    import srppo_trl.pipeline.run as pipeline

    def nothing_may_load(*args, **kwargs):
        raise AssertionError("a model, tokenizer or data set was loaded before the arguments were checked")

    for name in ("resolve_base_model", "load_tokenizer", "build_stage_data", "run_sft", "run_rl"):
        monkeypatch.setattr(pipeline, name, nothing_may_load)
    with pytest.raises(ValueError, match=message):
        main(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "false", *override],
            default_config=str(ROOT / "recipes" / "configs" / "mistral_min_overlap.yaml"),
        )
    assert not (tmp_path / "sft").exists()


def test_the_srppo_console_script_exits_0_after_a_run(monkeypatch):
    """A console script exits with what its function returns: the pipeline's results dict would read as status 1."""
    import importlib
    import re

    import srppo_trl.pipeline.run as run

    target = re.search(r'^srppo = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    module, function = target.split(":")
    monkeypatch.setattr(run, "main", lambda argv=None, default_config=None: {"sft_model": "out/sft"})
    entry = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exited:
        sys.exit(entry())
    assert exited.value.code in (None, 0)
