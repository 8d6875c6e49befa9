"""The Colab/Jupyter walkthrough executes top to bottom on CPU (SmolLM2 + LoRA, a few steps) so it cannot rot."""

import os
from pathlib import Path

import pytest


NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "srppo_lora_walkthrough.ipynb"


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SRPPO_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
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
