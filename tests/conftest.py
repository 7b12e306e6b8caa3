"""Test-wide settings: never download anything, keep CPU use to the 2 cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so every start, epoch report and
# finish of a run waits up to 2 s; the suite runs about 15 short runs (a test setting, not a fix)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None
else:
    torch.set_num_threads(2)
