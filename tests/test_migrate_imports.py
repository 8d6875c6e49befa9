"""scripts/migrate_imports.py: old import paths rewritten to the modules' homes; the repository itself has none left."""

import importlib.util
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "migrate_imports.py"


def _load():
    spec = importlib.util.spec_from_file_location("migrate_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(tmp_path):
    root = tmp_path / "src" / "srppo_trl"
    for sub in ["models", "data", "rewards", "trainer", "evaluation", "pipeline"]:
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    for module in ["trainer/scoring", "trainer/checkpointing", "models/coherent_reward", "pipeline/run"]:
        (root / f"{module}.py").write_text("")
    return root


def test_absolute_imports_strings_and_package_imports_are_rewritten(tmp_path):
    migrate = _load()
    text = (
        "from srppo_trl.ppo_math import masked_whiten\n"
        "from srppo_trl import SRPPOConfig, modeling, spin as spin_module\n"
        'monkeypatch.setattr("srppo_trl.rollout.sample_responses", fake)\n'
        'caplog.at_level("INFO", logger="srppo_trl.modeling")\n'
        "from srppo_trl.pipeline import run_pipeline\n"
        "from srppo_trl.single_base import build_single_base\n"
    )
    assert migrate.rewrite(text, tmp_path / "tests" / "test_x.py") == (
        "from srppo_trl.trainer.ppo_math import masked_whiten\n"
        "from srppo_trl import SRPPOConfig\n"
        "from srppo_trl.models import modeling\n"
        "from srppo_trl.pipeline import spin as spin_module\n"
        'monkeypatch.setattr("srppo_trl.trainer.rollout.sample_responses", fake)\n'
        'caplog.at_level("INFO", logger="srppo_trl.models.modeling")\n'
        "from srppo_trl.pipeline import run_pipeline\n"
        "from srppo_trl.single_base import build_single_base\n"
    )


def test_relative_imports_written_before_the_move_point_at_the_homes(tmp_path):
    migrate = _load()
    root = _package(tmp_path)
    text = (
        "from . import ppo_math\n"
        "from .checkpointing import last_complete_checkpoint\n"
        "from .coherent_reward import CoherentRewardModel\n"
        "    from .single_base import is_single_base\n"
    )
    assert migrate.rewrite(text, root / "trainer" / "scoring.py") == (
        "from . import ppo_math\n"
        "from .checkpointing import last_complete_checkpoint\n"
        "from ..models.coherent_reward import CoherentRewardModel\n"
        "    from ..models.single_base import is_single_base\n"
    )
    assert migrate.rewrite("from ..rollout import sample_responses\n", root / "evaluation" / "generation.py") == (
        "from ..trainer.rollout import sample_responses\n"
    )
    assert migrate.rewrite("    from .checkpointing import x\n", root / "pipeline" / "run.py") == (
        "    from ..trainer.checkpointing import x\n"
    )


def test_the_rewrite_is_idempotent(tmp_path):
    migrate = _load()
    root = _package(tmp_path)
    text = "from ..models.coherent_reward import CoherentRewardModel\nfrom srppo_trl.trainer.rollout import x\n"
    assert migrate.rewrite(text, root / "trainer" / "scoring.py") == text


def test_the_repository_has_no_old_import_left():
    files = [
        str(path)
        for folder in ["src", "tests", "scripts", "benchmarks", "recipes"]
        for path in (ROOT / folder).rglob("*.py")
        if path not in (SCRIPT, Path(__file__).resolve())
    ]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
