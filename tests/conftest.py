"""Test-wide settings: never download anything, keep CPU use to the 2 cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None
else:
    torch.set_num_threads(2)
