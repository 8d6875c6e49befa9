"""Test-wide settings. Tiny models run fastest on one thread, and CI's 2 cores may be shared with other jobs."""

import os

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
