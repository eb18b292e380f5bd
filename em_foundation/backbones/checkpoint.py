"""Checkpoint files: read a weights file's tensors and load them strictly into a model.

Used for ``weights: <file>`` in a backbone's config entry; the hub's pretrained weights are
found by ``hub`` and loaded by each family's own library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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


def timm_checkpoint_filter(model: torch.nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
    """timm's own key conversion for ``model``'s class: the ``checkpoint_filter_fn`` of its module.

    It is what timm's pretrained loader applies to a hub or ``file`` override, and it turns
    the authors' layouts into timm's names (Meta's DINOv2 ``mask_token`` and registers,
    Meta's DINOv3 ``storage_tokens``/``ls1.gamma``/``qkv.bias_mask``, OpenAI/OpenCLIP trunks).
    """
    import importlib

    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return lambda state, _model: state
    return filter_fn


def load_weights_strict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    trimmed: Callable[[str], bool] | None = None,
    ignored: Callable[[str], bool] | None = None,
) -> None:
    """Load a checkpoint and name the first mismatched keys if it does not fit the model.

    ``trimmed``: keys of parts the caller removes after loading (a stage or head it never
    runs); a file may hold them or not. ``ignored``: file keys that are not model weights
    on purpose (a classifier the model was built without). Missing BatchNorm
    ``num_batches_tracked`` buffers are filled with 0 by torch's own loader, as torch and
    smp accept files in torchvision's layout that lack them.
    """
    expected = model.state_dict()
    trimmed = trimmed or (lambda _key: False)
    ignored = ignored or (lambda _key: False)
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked") and not trimmed(k)]
    unexpected = [k for k in state if k not in expected and not ignored(k)]
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
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def load_converted(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    filter_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
    **checks: Callable[[str], bool] | None,
) -> None:
    """A file in any layout timm converts (``filter_fn``, default timm's for the model), loaded strictly.

    Loaded into the whole model the file was saved from, before the caller trims it, so the
    parts it removes are known keys and not "unexpected" ones.
    """
    converted = (filter_fn or timm_checkpoint_filter(model))(dict(state), model)
    load_weights_strict(model, converted, path, **checks)
