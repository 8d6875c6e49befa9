"""SFT -> SRPPO end to end: the recipes' pipeline, its single-base mode, the SPIN baseline and the SmolLM2 demo model.

`run.py` is the pipeline (`run_pipeline`, `main`: the `srppo` command), `single_base.py` its single-base mode,
`spin.py` the SPIN baseline on TRL's DPOTrainer, `smollm2.py` the offline SmolLM2-135M-Instruct download.

`srppo_trl.pipeline` is the stable import path of every public name of `srppo_trl.pipeline.run`
(`from srppo_trl.pipeline import PipelineArguments, run_pipeline, main`); they load on first use.
"""

from importlib import import_module
from importlib.util import find_spec


def __getattr__(name):
    # A submodule imports as usual; any other public name is `run`'s, loaded on first use.
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is None:
        module = import_module(f"{__name__}.run")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
