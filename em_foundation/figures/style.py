"""Figure style and saving: one style file, every figure as PNG and PDF, written atomically."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from em_foundation.io import atomic_path  # noqa: E402


def use_style(name: str = "paper") -> None:
    path = resources.files("em_foundation.figures").joinpath(f"{name}.mplstyle")
    if not path.is_file():
        raise FileNotFoundError(
            f"figure style {name!r} not found at {path}; set figures.style to 'paper' or add the file"
        )
    plt.style.use(str(path))


def save_figure(figure: plt.Figure, outputs: Iterable[str | Path]) -> None:
    """Save one figure to each output path, its format taken from the extension."""
    for output in outputs:
        suffix = Path(output).suffix
        with atomic_path(output, suffix=suffix) as tmp:
            figure.savefig(tmp, format=suffix.lstrip("."))
    plt.close(figure)
