"""Where pretrained weights live, so compute nodes without internet load them offline."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def hub_environment(cache_dir: str | os.PathLike, offline: bool = True) -> Iterator[Path]:
    """Point Hugging Face and torch hub caches at ``cache_dir`` for the duration.

    ``offline=True`` is for compute rules: they must only read what ``fetch_weights``
    put there on the login node, never reach the internet.
    """
    cache = Path(cache_dir).resolve()
    overrides = {
        "HF_HOME": str(cache / "huggingface"),
        "TORCH_HOME": str(cache / "torch"),
    }
    if offline:
        overrides.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield cache
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
