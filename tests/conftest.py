"""Test-wide settings. Tiny models run fastest on one thread, and CI's 2 cores may be shared with other jobs."""

import os

import pytest
import torch

from srppo_trl.testing import tiny_causal_lm, tiny_tokenizer


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A folder with a tiny Llama and its tokenizer: a stand-in `base_model` for the pipeline and scripts."""
    folder = tmp_path_factory.mktemp("tiny_base")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cpu_bf16(monkeypatch):
    """bf16=True allowed on this CPU whatever its instructions (tiny models: software bf16 is slow but fine)."""
    monkeypatch.setenv("SRPPO_ALLOW_SLOW_CPU_BF16", "1")
