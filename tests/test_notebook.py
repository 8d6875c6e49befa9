"""The Colab/Jupyter walkthrough executes top to bottom on CPU (SmolLM2 + LoRA, a few steps) so it cannot rot."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest


NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "srppo_lora_walkthrough.ipynb"
_FIND_SPEC = importlib.util.find_spec  # the real one, before any test patches it


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SRPPO_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The "python3" kernel spec may start `python` from PATH: make it this interpreter (the venv's), wherever pytest
    # was started from.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "srppo_model" in outputs
    assert (tmp_path / "outputs" / "notebook_smollm2_lora" / "srppo" / "adapter_model.safetensors").exists()
    assert os.path.exists(tmp_path / "outputs" / "notebook_smollm2_lora" / "results.json")


def _install_cell() -> str:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    assert "SRPPO_TRL_SOURCE" in cell.source, "the first code cell is the install cell"
    return cell.source


def _run_install_cell(monkeypatch, source: str | None, installed: bool) -> list:
    """Execute the install cell as Colab would, with srppo_trl importable or not; returns the pip commands it ran."""
    import importlib.util
    import subprocess

    calls = []
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "srppo_trl" and not installed else _FIND_SPEC(name, *a),
    )
    monkeypatch.setattr(subprocess, "check_call", lambda command, **kw: calls.append(command) or 0)
    if source is None:
        monkeypatch.delenv("SRPPO_TRL_SOURCE", raising=False)
    else:
        monkeypatch.setenv("SRPPO_TRL_SOURCE", source)
    namespace: dict = {}
    exec(compile(_install_cell(), "install-cell", "exec"), namespace)
    return calls


def test_install_cell_installs_from_the_given_source(tmp_path, monkeypatch):
    wheel = tmp_path / "srppo_trl-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    [command] = _run_install_cell(monkeypatch, str(wheel), installed=False)
    assert command[1:4] == ["-m", "pip", "install"]
    assert command[-1] == f"srppo-trl[eval,gguf,quantization] @ {wheel.resolve().as_uri()}"
    [command] = _run_install_cell(monkeypatch, "git+https://github.com/o/srppo-trl.git", installed=False)
    assert command[-1] == "srppo-trl[eval,gguf,quantization] @ git+https://github.com/o/srppo-trl.git"
    assert _run_install_cell(monkeypatch, None, installed=True) == []  # already installed: nothing to do
    with pytest.raises(RuntimeError, match="SRPPO_TRL_SOURCE"):
        _run_install_cell(monkeypatch, None, installed=False)


def test_install_cell_requirement_is_one_pip_resolves(tmp_path, monkeypatch):
    """pip itself reads the cell's requirement for this repository's folder (metadata only, no index, no install)."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is needed to read the project's metadata without build isolation")
    root = NOTEBOOK.parents[1]
    namespace: dict = {}
    monkeypatch.setenv("SRPPO_TRL_SOURCE", str(root))
    exec(compile(_install_cell(), "install-cell", "exec"), namespace)  # installed here: defines, does not install
    requirement = namespace["pip_requirement"](str(root))
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "--report", str(report), requirement],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    [item] = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "srppo-trl"
    assert sorted(item["requested_extras"]) == ["eval", "gguf", "quantization"]
