"""The training loop: AdamW, gradient clipping, early stopping on validation loss, resumable.

A job killed midway (clusters preempt) resumes from its per-epoch checkpoint when rerun
and ends where an uninterrupted run would: the checkpoint holds the model, optimiser,
RNG states and early-stopping state, and is only trusted when its fingerprint (the run's
config) matches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from em_foundation.backbones.lora import trainable_state_dict
from em_foundation.data.streaming import PREFETCH_DEPTH, StoredRows, prefetched, take
from em_foundation.io import atomic_path
from em_foundation.training.augment import augment_batch
from em_foundation.training.losses import soft_dice_loss
from em_foundation.training.sampling import epoch_batches

InputFn = Callable[[np.ndarray], torch.Tensor]


@dataclass
class TrainingData:
    """Inputs stay in their stored form (float16 tokens or uint8 pixels) until batched.

    ``inputs`` and ``labels`` are arrays in memory, or ``StoredRows`` read batch by batch
    from their HDF5 files (streaming); ``loading`` says which and why (data.streaming.choose_loading).
    """

    inputs: np.ndarray | StoredRows
    labels: np.ndarray | StoredRows
    sources: np.ndarray
    to_tensor: InputFn
    loading: dict[str, Any] = field(default_factory=lambda: {"mode": "in-memory", "reason": "arrays given"})

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streaming(self) -> bool:
        return isinstance(self.inputs, StoredRows) or isinstance(self.labels, StoredRows)

    def subset(self, index: Any) -> "TrainingData":
        """Some tiles (a mask or sorted indices), still in memory or still on disk."""
        return TrainingData(
            take(self.inputs, index), take(self.labels, index), self.sources[index], self.to_tensor, self.loading
        )

    def batch(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's inputs and labels as CPU tensors, in the order of ``index``."""
        return self.to_tensor(self.inputs[index]), torch.from_numpy(np.ascontiguousarray(self.labels[index]))

    def batches(self, indices: Iterable[Any], depth: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``indices`` in order; streamed ones read up to ``depth`` ahead on a background thread."""
        return prefetched(indices, self.batch, depth if self.streaming else 0)


def prefetch_depth(device: torch.device) -> int:
    """How many batches of a streamed split are read ahead, on a background thread.

    On a GPU the host is idle while the device computes, so the next batches are read
    meanwhile. On a CPU the same cores (and Python's GIL) do both: a reader thread made
    epochs ~12 % slower than reading each batch in line (benchmarks/README.md, "Memory").
    """
    return PREFETCH_DEPTH if device.type == "cuda" else 0


class NonFiniteLoss(FloatingPointError):
    """Training diverged: a loss became NaN or infinite, so no model of this run can be trusted."""

    def __init__(self, epoch: int, which: str, value: float) -> None:
        super().__init__(f"the {which} loss of epoch {epoch} is {value}")
        self.epoch, self.which, self.value = epoch, which, value


class TrainingDiverged(RuntimeError):
    """A run's training diverged; the message names the run, the epoch and the settings to change."""


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    stop_reason: str
    resumed_from_epoch: int = 0
    sampled_per_source: dict[str, int] = field(default_factory=dict)
    steps_run: int = 0
    best_step: int = 0


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Frozen backbone weights never change, so neither checkpoints nor the best state copy them.
    return trainable_state_dict(model)


def _load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint has keys the model lacks: {result.unexpected_keys[:5]}")


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


VAL_LOSSES = ("pooled", "per_source")


def _validation_loss(model: torch.nn.Module, data: TrainingData, batch_size: int, device: torch.device) -> float:
    """Mean batch loss over every validation tile, weighted by batch size."""
    model.eval()
    # Summed on the device and read once: a read per batch would make a GPU wait each time.
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        starts = range(0, len(data), batch_size)
        for inputs, labels in data.batches((slice(s, s + batch_size) for s in starts), prefetch_depth(device)):
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs, tuple(labels.shape[-2:]))
            total += soft_dice_loss(logits, labels).double() * len(labels)
            count += len(labels)
    return total.item() / max(count, 1)


def make_optimizer(parameters: list[torch.nn.Parameter], training: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the config's learning rate and weight decay (``training`` block)."""
    return torch.optim.AdamW(parameters, lr=training["lr"], weight_decay=training["weight_decay"])


def train_step(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grad_clip: float,
) -> torch.Tensor:
    """One optimisation step: soft Dice at the labels' size, backward, gradient clipping, optimiser step.

    Returns the loss, detached and left on the device (reading it would make a GPU wait).
    """
    loss = soft_dice_loss(model(inputs, tuple(labels.shape[-2:])), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    return loss.detach()


def validation_losses(
    model: torch.nn.Module, data: TrainingData, batch_size: int, device: torch.device, mode: str = "pooled"
) -> tuple[float, dict[str, float]]:
    """The loss early stopping reads, and each source dataset's own validation loss.

    ``pooled`` (published): every validation tile weighs the same, so in a 10:1 union the
    larger dataset alone decides when to stop. ``per_source``: each source's loss (its tiles
    only, batched on their own) weighs the same, whatever its size.
    """
    if mode not in VAL_LOSSES:
        raise ValueError(f"training.val_loss {mode!r} is not one of {', '.join(VAL_LOSSES)}")
    names = sorted(set(map(str, data.sources)))
    if len(names) < 2:
        loss = _validation_loss(model, data, batch_size, device)
        return loss, {}
    per_source = {}
    for name in names:
        per_source[name] = _validation_loss(model, data.subset(data.sources == name), batch_size, device)
    if mode == "per_source":
        return float(np.mean(list(per_source.values()))), per_source
    return _validation_loss(model, data, batch_size, device), per_source


def stop_reason_now(state: dict[str, Any], training: dict[str, Any]) -> str | None:
    """Why training stops after the epoch just ended, or None to go on.

    ``min_steps`` optimiser steps come first, whatever ``max_epochs`` and patience say: a
    1-slice run makes a few steps an epoch, so an epoch budget alone would stop it after
    a hundredth of the optimisation a full-data run gets. ``patience_steps`` (when set)
    counts optimiser steps since the best validation loss instead of epochs, so that
    patience means the same optimisation at every label budget. The defaults (0, null)
    are the published rule: ``patience`` epochs, at most ``max_epochs``.
    """
    if state["step"] < int(training.get("min_steps") or 0):
        return None
    patience_steps = training.get("patience_steps")
    if patience_steps is None:
        if state["bad_epochs"] >= training["patience"]:
            return "early_stopping"
    elif state["step"] - state["best_step"] >= int(patience_steps):
        return "early_stopping"
    if state["epoch"] >= training["max_epochs"]:
        return "max_epochs"
    return None


def fit(
    model: torch.nn.Module,
    train: TrainingData,
    val: TrainingData,
    training: dict[str, Any],
    generator: torch.Generator,
    device: torch.device,
    checkpoint: Path,
    fingerprint: str,
    balanced: bool = False,
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train until the validation loss has not improved for ``patience`` epochs (or
    ``patience_steps`` optimiser steps), after at least ``min_steps`` steps (stop_reason_now).

    A non-finite training or validation loss raises NonFiniteLoss at once: early stopping
    would otherwise "succeed" with no best state and the failure would surface only at
    evaluation. ``stop_after_epochs`` ends the process's work early (for tests that simulate a killed
    job); the checkpoint then lets a rerun continue.
    """
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, training)
    state: dict[str, Any] = {
        "epoch": 0,
        "best_val": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "step": 0,
        "best_step": 0,
        "history": [],
        "best_state": None,
        "drawn": {},
    }
    resumed_from = 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            _load_trainable_state(model, saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            resumed_from = state["epoch"]
            print(f"resumed from {checkpoint} after epoch {resumed_from}", flush=True)
        else:
            print(f"ignoring {checkpoint}: it belongs to another configuration", flush=True)
    state.setdefault("step", 0)  # a checkpoint from before steps were counted
    state.setdefault("best_step", 0)
    epochs_this_process = 0
    # An epoch bar: min_steps may carry a small run past max_epochs (the bar then overruns its total).
    progress = tqdm(desc="epochs", unit="epoch", initial=state["epoch"], total=training["max_epochs"])
    while (stop_reason := stop_reason_now(state, training)) is None:
        epoch = state["epoch"]
        started = time.perf_counter()
        model.train()
        losses = []
        order = epoch_batches(train.sources, training["batch_size"], generator, balanced)
        for batch, (inputs, labels) in zip(order, train.batches(order, prefetch_depth(device))):
            for source in train.sources[batch]:
                state["drawn"][str(source)] = state["drawn"].get(str(source), 0) + 1
            inputs, labels = inputs.to(device), labels.to(device)
            inputs, labels = augment_batch(inputs, labels, training.get("augment", "none"), generator)
            loss = train_step(model, parameters, optimizer, inputs, labels, training["grad_clip"])
            state["step"] += 1
            losses.append(loss)  # read once per epoch, not per step (no GPU sync)
        train_loss = torch.stack(losses).double().mean().item() if losses else math.nan
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(epoch + 1, "training", train_loss)
        val_loss, per_source = validation_losses(
            model, val, training["batch_size"], device, training.get("val_loss", "pooled")
        )
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(epoch + 1, "validation", val_loss)
        improved = val_loss < state["best_val"]
        if improved:
            state.update(
                best_val=val_loss,
                best_epoch=epoch + 1,
                best_step=state["step"],
                bad_epochs=0,
                best_state=_trainable_state(model),
            )
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append(
            {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "improved": improved,
                "seconds": time.perf_counter() - started,
                **{f"val_loss_{name}": loss for name, loss in per_source.items()},
            }
        )
        progress.update()
        progress.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", step=state["step"])
        _save_checkpoint(
            checkpoint,
            {
                "fingerprint": fingerprint,
                "model": _trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            },
        )
        epochs_this_process += 1
        if stop_after_epochs is not None and epochs_this_process >= stop_after_epochs:
            raise InterruptedError(f"stopped after {epochs_this_process} epochs as asked (simulated preemption)")
    progress.close()
    return FitResult(
        best_state=state["best_state"],
        history=pd.DataFrame(state["history"]),
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val"],
        stop_reason=stop_reason,
        resumed_from_epoch=resumed_from,
        sampled_per_source=dict(state["drawn"]),
        steps_run=int(state["step"]),
        best_step=int(state["best_step"]),
    )
