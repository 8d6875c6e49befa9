"""Data: the builders of the paper's data settings, prompt tokenization, and the small demo data shipped here.

`builders.py` loads TULU-v2 / UltraFeedback (or local files) into TRL's conversational formats and checks prompt
lengths; `tokenization.py` renders a prompt with the BOS the base model expects (shared by SFT, rollouts, rewards and
evaluation); `demo.py` reads the demo files in this folder (`demo_sft.jsonl`, `demo_prompts.jsonl`; see README.md).

`srppo_trl.data` is the stable import path of every public name of `srppo_trl.data.builders`
(`from srppo_trl.data import build_sft_data, build_ppo_prompts`); they load on first use.
"""

from importlib import import_module
from importlib.util import find_spec


def __getattr__(name):
    # A submodule imports as usual; any other public name is `builders`'s, loaded on first use.
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is None:
        module = import_module(f"{__name__}.builders")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
