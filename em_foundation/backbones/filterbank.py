"""Hand-crafted filter-bank features: the baseline backbone that needs no weights.

Why: interactive pixel-classification tools (ilastik) segment EM mitochondria well from a
small bank of Gaussian-derivative filters at a few scales plus a random forest. If a
foundation model's features are "foundational", they should beat this; if they do not,
the transfer question is moot. The bank is the ilastik default set, per scale sigma:

    gaussian   Gaussian smoothing
    log        Laplacian of Gaussian
    ggm        Gaussian gradient magnitude
    hess1/2    Hessian-of-Gaussian eigenvalues (descending)
    st1/2      structure-tensor eigenvalues (inner scale sigma, outer scale 2 sigma, descending)

plus the raw intensity once. Filters run at full resolution with scipy.ndimage on
float32 (``mode="reflect"``); the backbone average-pools them to a patch grid so that the
same heads and caches serve it as serve the ViTs. Responses are not scale-normalised
(as in ilastik): their standard deviations span four orders of magnitude. The forest's
splits do not mind; the deconvolution head does (its BatchNorm layers then behave very
differently in training and evaluation mode), so it standardises filter-bank tokens with
their training-set statistics (``standardise_tokens`` in ``em_foundation/families.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from em_foundation.backbones.base import Backbone, BackboneOutput
from em_foundation.families import FAMILIES

DEFAULT_SIGMAS = (0.7, 1.6, 3.5, 5.0)
FILTERS_PER_SCALE = ("gaussian", "log", "ggm", "hess1", "hess2", "st1", "st2")
STRUCTURE_OUTER = 2.0  # outer (integration) scale of the structure tensor, in units of sigma
FILTER_SET_VERSION = "v1"  # bump whenever the filters' arithmetic changes
_OPTIONS = set(FAMILIES["filterbank"].options)


def channel_names(sigmas: Sequence[float]) -> list[str]:
    """Channel order of ``pixel_features``: raw first, then the bank scale by scale."""
    return ["raw"] + [f"{name}@{float(s):g}" for s in sigmas for name in FILTERS_PER_SCALE]


def _eigen_2x2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of the symmetric matrices [[a, b], [b, c]], larger first."""
    mean = 0.5 * (a + c)
    radius = np.sqrt((0.5 * (a - c)) ** 2 + b**2)
    return mean + radius, mean - radius


def _scale_features(image: np.ndarray, sigma: float) -> list[np.ndarray]:
    """The seven filters of one scale, sharing the derivative filtering between them."""

    def gauss(data: np.ndarray, order: tuple[int, int], s: float = sigma) -> np.ndarray:
        return ndimage.gaussian_filter(data, s, order=order, mode="reflect", output=np.float32)

    smooth = gauss(image, (0, 0))
    d_row, d_col = gauss(image, (1, 0)), gauss(image, (0, 1))
    h_rr, h_cc, h_rc = gauss(image, (2, 0)), gauss(image, (0, 2)), gauss(image, (1, 1))
    # scipy's gaussian_laplace is exactly the sum of the two second derivatives.
    log = h_rr + h_cc
    ggm = np.sqrt(d_row**2 + d_col**2)
    hess = _eigen_2x2(h_rr, h_rc, h_cc)
    outer = STRUCTURE_OUTER * sigma
    structure = _eigen_2x2(
        gauss(d_row * d_row, (0, 0), outer), gauss(d_row * d_col, (0, 0), outer), gauss(d_col * d_col, (0, 0), outer)
    )
    return [smooth, log, ggm, *hess, *structure]


def pixel_features(image: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> np.ndarray:
    """(H, W) image to (C, H, W) float32 features at full resolution, ``channel_names`` order.

    This is also what a per-pixel learner (the random-forest regime) consumes.
    """
    if image.ndim != 2:
        raise ValueError(f"pixel_features takes one (H, W) image, got shape {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    channels = [image]
    for sigma in sigmas:
        channels.extend(_scale_features(image, float(sigma)))
    return np.stack(channels).astype(np.float32, copy=False)


def pool_to_grid(features: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) to (C, H/p, W/p) by averaging each p x p patch."""
    channels, height, width = features.shape
    blocks = features.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


class FilterBankBackbone(Backbone):
    """The filter bank as a backbone: no parameters, deterministic, computed on the CPU.

    Images are used as they come, in [0, 1] and single-channel: no 3-channel replication
    and no ImageNet constants (the buffers are identity, so ``describe`` says so).
    """

    family = "filterbank"

    def __init__(
        self, sigmas: Sequence[float] = DEFAULT_SIGMAS, patch_size: int = FAMILIES["filterbank"].default_patch
    ) -> None:
        family = FAMILIES["filterbank"]
        super().__init__(mean=family.mean, std=family.std)
        sigmas = tuple(float(s) for s in sigmas)
        if not sigmas or any(not np.isfinite(s) or s <= 0 for s in sigmas):
            raise ValueError(f"filterbank sigmas must be a non-empty list of positive numbers, got {list(sigmas)}")
        if int(patch_size) != patch_size or patch_size < 1:
            raise ValueError(f"filterbank patch_size must be a positive integer, got {patch_size!r}")
        self.sigmas = sigmas
        self.patch_size = int(patch_size)
        self.channel_names = channel_names(sigmas)
        self.embed_dim = len(self.channel_names)
        self.identity = (
            f"filterbank-{FILTER_SET_VERSION}:raw+{','.join(FILTERS_PER_SCALE)}"
            f":st_outer={STRUCTURE_OUTER:g}sigma:sigmas={','.join(f'{s:g}' for s in sigmas)}"
            f":patch={self.patch_size}:mode=reflect"
        )

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        self.check_input(images)
        batch = images.detach().to("cpu", torch.float32).numpy()[:, 0]
        grids = np.stack([pool_to_grid(pixel_features(image, self.sigmas), self.patch_size) for image in batch])
        grid = torch.from_numpy(grids).to(images.device)
        return BackboneOutput(grid=grid, pooled=grid.mean(dim=(2, 3)))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "sigmas": list(self.sigmas), "channels": list(self.channel_names)}


def build(spec: dict[str, Any]) -> Backbone:
    """Build from a config entry; ``options`` takes ``sigmas`` and ``patch_size``."""
    options = spec.get("options") or {}
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"filterbank options {sorted(unknown)} are unknown; allowed: {sorted(_OPTIONS)}")
    return FilterBankBackbone(
        sigmas=options.get("sigmas", DEFAULT_SIGMAS),
        patch_size=options.get("patch_size", FAMILIES["filterbank"].default_patch),
    )
