"""Checkpoint files: read a weights file's tensors and load them strictly into a model.

Used for ``weights: <file>`` in a backbone's config entry; the hub's pretrained weights are
found by ``hub`` and loaded by each family's own library.
"""

from __future__ import annotations

from pathlib import Path

import torch


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message names the file and the fix."""


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; set backbones.<name>.weights to an existing "
            "checkpoint, to 'pretrained' to fetch the hub weights, or to 'random'"
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``.safetensors`` or a torch file, ``state_dict``/``model`` unwrapped)."""
    require_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, truncated, or a pickle that is not a state dict
        # PyTorch's own text advises weights_only=False (unsafe, and no cure for a damaged file): keep its first sentence.
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"weights file {path} is not a checkpoint file ({reason}); replace it with the model's weights "
            "(torch.save or .safetensors), or set backbones.<name>.weights to 'pretrained' or 'random'"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint and name the first mismatched keys if it does not fit the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys (first 5 of {len(missing)}): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys (first 5 of {len(unexpected)}): {unexpected[:5]}")
        if wrong_shape:
            parts.append(f"shape mismatches (first 5 of {len(wrong_shape)}): {wrong_shape[:5]}")
        raise WeightsError(
            f"weights file {path} does not fit the architecture {type(model).__name__}: "
            + "; ".join(parts)
            + ". Check that backbones.<name>.model (and model_kwargs) name the architecture the file was saved from."
        )
    model.load_state_dict(state, strict=True)
