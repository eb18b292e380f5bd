"""AdaBN (Li et al. 2016): re-estimate batch-norm statistics on the target domain.

A head trained on one dataset (or on a union) normalises every BatchNorm layer's input
with running statistics of the *training* data. AdaBN replaces them with the statistics of
the target dataset's unlabelled inputs and changes nothing else: weights, biases and every
other buffer stay as trained. Using the test images themselves is transductive (their
labels are never used); the target's unlabelled train split is the inductive alternative.

Procedure (``adapt_batchnorm``): on a deep copy of the model, reset every selected
BatchNorm layer's running statistics, set ``momentum=None`` (PyTorch's cumulative average
instead of an exponential one), put only those layers in train mode (dropout and the rest
stay in eval), run the target batches forward under ``torch.no_grad``, then restore the
original momentum and eval mode.

``pooled`` (default True) differs from the bare ``momentum=None`` procedure in one way:
with ``momentum=None`` PyTorch's running mean is the *average of per-batch means* and its
running variance the *average of per-batch unbiased variances*. That is right only for
equal-sized batches that are random samples of the domain; with ordered batches (tiles of
one slice together) or the study's batch size of 2 it leaves out the variance between
batches and underestimates the domain's variance. ``pooled=True`` also accumulates each
layer's input moments over all positions of all batches (float64, Chan's merge) and writes
the pooled mean and unbiased variance at the end, which is AdaBN's definition (statistics
of all target data). During the pass itself the layers normalise with per-batch statistics
in both modes, so deeper layers see what a train-mode pass shows them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from em_foundation.alignment.features import RunningMoments

ForwardFn = Callable[[nn.Module, torch.Tensor], Any]


def batchnorm_layers(model: nn.Module, select: Callable[[str], bool] | None = None) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, layer) of every BatchNorm layer that keeps running statistics."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats and (select is None or select(name))
    ]


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _default_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    device = _model_device(model)
    return model(batch.to(device) if device is not None else batch)


def segmenter_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    """``forward`` for the project's segmenters and DeconvHead, which also take an output size.

    The output size only sets the final bilinear resize, after the last batch-norm layer,
    so the batch's own grid size is passed.
    """
    device = _model_device(model)
    batch = batch.to(device) if device is not None else batch
    return model(batch, tuple(batch.shape[-2:]))


def iterate_batches(
    inputs: np.ndarray, batch_size: int, to_tensor: Callable[[np.ndarray], torch.Tensor] | None = None
) -> Iterator[torch.Tensor]:
    """Consecutive batches of an array (e.g. a dataset's cached tokens) as tensors.

    Pass a shuffled index view if the order carries structure and ``pooled=False``.
    """
    convert = to_tensor or (lambda chunk: torch.from_numpy(np.ascontiguousarray(chunk)))
    for start in range(0, len(inputs), batch_size):
        yield convert(inputs[start : start + batch_size])


def _moments_hook(moments: RunningMoments) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        dims = [0, *range(2, x.ndim)]
        variance, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        moments.merge(n, mean.cpu().numpy(), (variance * n).cpu().numpy())

    return hook


def adapt_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    forward: ForwardFn | None = None,
    *,
    pooled: bool = True,
    select: Callable[[str], bool] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are those of ``batches``.

    ``forward(model, batch)`` runs one batch (default ``model(batch)`` with the batch moved
    to the model's device; use ``segmenter_forward`` for the segmenters and DeconvHead).
    ``select(name)`` restricts adaptation to some layers by qualified name (default: all
    BatchNorm layers that track running statistics). The source model is not touched; the
    copy is returned in eval mode. Raises if there is no BatchNorm layer to adapt or no
    batch was given (reset statistics with nothing seen would be 0 mean / unit variance).
    """
    adapted = copy.deepcopy(model)
    layers = batchnorm_layers(adapted, select)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics to adapt")
    run = forward or _default_forward
    momenta = {name: layer.momentum for name, layer in layers}
    moments = {name: RunningMoments(layer.num_features) for name, layer in layers}
    hooks = []
    for name, layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        if pooled:
            hooks.append(layer.register_forward_pre_hook(_moments_hook(moments[name])))
    adapted.eval()
    for _, layer in layers:
        layer.train()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                run(adapted, batch)
                n_batches += 1
    finally:
        for handle in hooks:
            handle.remove()
        for name, layer in layers:
            layer.momentum = momenta[name]
        adapted.eval()
    if n_batches == 0:
        raise ValueError("no target batches: batch-norm statistics cannot be re-estimated from nothing")
    if pooled:
        for name, layer in layers:
            stats = moments[name]
            if stats.n < 2:
                raise ValueError(f"layer {name!r} saw {stats.n} value(s) per channel; need at least 2")
            layer.running_mean.copy_(torch.from_numpy(stats.mean).to(layer.running_mean))
            layer.running_var.copy_(torch.from_numpy(stats.variance(ddof=1)).to(layer.running_var))
    return adapted
