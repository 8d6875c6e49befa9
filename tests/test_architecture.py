"""The package layout of docs/architecture.md, enforced: which subpackage may import which, no private names across
subpackages, the top-level re-export modules used by nobody inside the package, and the stable import paths."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "srppo_trl"

# What each subpackage may import besides itself (docs/architecture.md): layers, bottom (models, data) to top.
ALLOWED = {
    "models": set(),
    "data": set(),
    "rewards": {"models"},
    "trainer": {"models", "data", "rewards"},
    "evaluation": {"models", "data", "rewards", "trainer"},
    "pipeline": {"models", "data", "rewards", "trainer", "evaluation"},
}
LAYERS = list(ALLOWED)


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, root: Path):
    """(line, imported module as a list of names, imported names) for every import of `root`'s package in `path`,
    wherever it stands (module level or inside a function)."""
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root.name:
                    yield node.lineno, alias.name.split("."), []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == root.name:
                module = node.module.split(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            if node.module is None:  # `from . import ppo_math`: the names are modules
                for name in names:
                    yield node.lineno, module + [name], []
            else:
                yield node.lineno, module, names


def import_violations(root: Path) -> list[str]:
    """Every import in the subpackages of `root` that breaks the layering, reaches a top-level module, or takes a
    private name from another subpackage; one line each: `path:line: what`."""
    top_level = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            continue  # the top level (`__init__`, the test helpers, the stable re-export modules) may import anything
        own = rel.parts[0]
        for line, module, names in _imports(path, root):
            where = f"{rel}:{line}"
            target = module[1] if len(module) > 1 else None
            if target is None:
                problems.append(f"{where}: imports the package root `{root.name}`; import from the subpackage itself")
            elif target in top_level:
                problems.append(f"{where}: imports the top-level `{'.'.join(module)}`; import its home module")
            elif target != own and target not in ALLOWED.get(own, ()):
                allowed = sorted(ALLOWED.get(own, ())) or "nothing else of the package"
                problems.append(f"{where}: `{own}/` may not import `{'.'.join(module)}` (it may import {allowed})")
            elif target != own:
                private = [name for name in names if name.startswith("_")]
                if private:
                    problems.append(f"{where}: private {private} imported from `{'.'.join(module)}`")
    return problems


def test_the_subpackages_import_only_the_layers_below_them():
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()) == sorted(LAYERS)
    assert import_violations(PACKAGE) == []


@pytest.mark.parametrize(
    "package, source, expected",
    [
        (
            "models",
            "from ..trainer.rollout import sample_responses\n",
            "`models/` may not import `srppo_trl.trainer.rollout`",
        ),
        ("models", "from .. import data\n", "`models/` may not import `srppo_trl.data`"),
        (
            "data",
            "from ..models.logprobs import gather_logprobs\n",
            "`data/` may not import `srppo_trl.models.logprobs`",
        ),
        ("rewards", "from srppo_trl.pipeline import run_pipeline\n", "`rewards/` may not import `srppo_trl.pipeline`"),
        (
            "trainer",
            "def f():\n    from ..single_base import build_single_base\n",
            "imports the top-level `srppo_trl.single_base`",
        ),
        (
            "trainer",
            "from ..data.builders import _describe\n",
            "private ['_describe'] imported from `srppo_trl.data.builders`",
        ),
    ],
)
def test_the_check_reports_each_kind_of_violation(tmp_path, package, source, expected):
    root = tmp_path / "srppo_trl"
    for name in LAYERS:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "single_base.py").write_text("")
    (root / package / "bad.py").write_text(source)
    problems = import_violations(root)
    assert len(problems) == 1 and problems[0].startswith(f"{package}/bad.py:") and expected in problems[0], problems


def test_same_package_and_lower_layer_imports_pass(tmp_path):
    root = tmp_path / "srppo_trl"
    for package in LAYERS:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "trainer" / "ok.py").write_text(
        "from . import ppo_math\nfrom .rollout import _private_here\nfrom ..models.modeling import eval_mode\n"
        "import srppo_trl.data.tokenization\n"
    )
    assert import_violations(root) == []


STABLE_PATHS = {
    "srppo_trl": ["CoherentRewardModel", "SRPPOConfig", "SRPPOTrainer", "build_value_model"],
    "srppo_trl.trainer": ["SRPPOTrainer", "SRPPOConfig", "last_complete_checkpoint", "response_mask_after_stop"],
    "srppo_trl.pipeline": ["PipelineArguments", "run_pipeline", "main", "load_causal_lm", "model_init_kwargs"],
    "srppo_trl.single_base": ["build_single_base", "is_single_base", "SFT_ADAPTER"],
    "srppo_trl.coherent_reward": ["CoherentRewardModel", "check_same_tokenizer", "check_same_vocabulary"],
    "srppo_trl.reward_funcs": ["make_coherent_reward_func"],
    "srppo_trl.smollm2": ["load_smollm2", "prepare_smollm2", "default_cache_dir", "main"],
    "srppo_trl.data": ["build_sft_data", "build_ppo_prompts", "prompt_input_ids"],
    "srppo_trl.evaluation": ["evaluate_offline", "generate_responses", "run_reward_diagnostics"],
    "srppo_trl.testing": ["tiny_tokenizer", "tiny_causal_lm"],
}


@pytest.mark.parametrize("module", sorted(STABLE_PATHS))
def test_the_stable_import_paths_keep_their_names(module):
    imported = __import__(module, fromlist=["_"])
    missing = [name for name in STABLE_PATHS[module] if not hasattr(imported, name)]
    assert missing == []


def test_the_stable_paths_are_the_home_objects():
    from srppo_trl import coherent_reward, single_base, smollm2
    from srppo_trl.models import coherent_reward as reward_home
    from srppo_trl.models import single_base as single_base_home
    from srppo_trl.pipeline import smollm2 as smollm2_home
    from srppo_trl.trainer import SRPPOTrainer
    from srppo_trl.trainer.srppo_trainer import SRPPOTrainer as home_trainer

    assert single_base.build_single_base is single_base_home.build_single_base
    assert coherent_reward.CoherentRewardModel is reward_home.CoherentRewardModel
    assert smollm2.prepare_smollm2 is smollm2_home.prepare_smollm2
    assert SRPPOTrainer is home_trainer


def test_the_reward_and_the_ppo_math_import_with_torch_alone():
    code = (
        "import sys; import srppo_trl.coherent_reward, srppo_trl.trainer.ppo_math, srppo_trl.models.logprobs; "
        "print(sorted(m for m in ('transformers', 'trl', 'datasets', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Class attributes every class has: not overrides.
_DUNDERS = {
    "__dict__",
    "__doc__",
    "__module__",
    "__weakref__",
    "__qualname__",
    "__firstlineno__",
    "__static_attributes__",
}


def test_every_trainer_override_is_defined_in_the_trainer_class():
    # A reader finds each method that changes `transformers.Trainer`'s (or TRL's `_BaseTrainer`'s) behaviour in
    # `SRPPOTrainer` itself; the mixins hold only helpers.
    from trl.trainer.base_trainer import _BaseTrainer

    from srppo_trl.trainer import SRPPOTrainer

    trainer_names = {name for cls in _BaseTrainer.__mro__ if cls is not object for name in vars(cls)}
    ours = [cls for cls in SRPPOTrainer.__mro__[1:] if cls.__module__.startswith("srppo_trl.")]
    inherited = sorted(
        f"{cls.__name__}.{name}"
        for cls in ours
        for name in vars(cls)
        if name in trainer_names and name not in _DUNDERS
    )
    assert inherited == []
