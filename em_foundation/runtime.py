"""Seeds, threads and devices: the same seed gives the same numbers on CPU."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG a run touches; returns a generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def configure(compute: dict) -> torch.device:
    """Apply the config's compute block: thread count and device choice."""
    torch.set_num_threads(int(compute.get("threads", 2)))
    wanted = compute.get("device", "auto")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is visible; set compute.device: auto or cpu")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)
