"""Hand-crafted filter-bank features: the baseline backbone that needs no weights, and
ilastik's pixel-classification features for the per-pixel forest.

Why: interactive pixel-classification tools (ilastik) segment EM mitochondria well from a
small bank of Gaussian-derivative filters at a few scales plus a random forest. If a
foundation model's features are "foundational", they should beat this; if they do not,
the transfer question is moot.

Two banks live here. ``ilastik_features`` is ilastik's own feature set with its arithmetic
(see its docstring); the per-pixel forest (``training/pixelforest.py``) uses it. The
backbone's pooled tokens use an older, smaller bank: a 4-scale Gaussian-derivative bank in
ilastik's style, without DoG and not with ilastik's arithmetic (no presmoothing, structure
tensor at 2 sigma), kept so that its caches and published numbers stay comparable; per scale sigma:

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


# --- ilastik's pixel-classification features ---------------------------------------------
# Sources (ilastik commit ebbaf9b9c, fastfilters commit 87f08b5):
#   ilastik/applets/featureSelection/opFeatureSelection.py   scales, feature order
#   lazyflow/operators/opPixelFeaturesPresmoothed.py          presmoothing and per-scale filter scale
#   lazyflow/operators/filterOperators.py                     which fastfilters call each feature is,
#                                                             window_size_feature = 2, minimum_scale
#   fastfilters src/library/fir_kernel.c                      kernel radius and normalisation
#   fastfilters src/library/fir_filters.c, src/python/core.cxx  LoG, gradient magnitude, structure tensor
ILASTIK_SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)  # opFeatureSelection.defaultScales
# Feature ids in ilastik's order (opFeatureSelection.FeatureGroups) with their channels.
ILASTIK_FEATURES = (("gaussian", 1), ("log", 1), ("ggm", 1), ("dog", 1), ("st", 2), ("hess", 2))
# filterOperators.py: OpBaseFilter.minimum_scale = 0.7, OpGaussianSmoothing.minimum_scale = 0.3;
# the feature dialog (featureTableWidget.py) offers a feature only at scales >= its minimum.
ILASTIK_MINIMUM_SCALE = {"gaussian": 0.3, "log": 0.7, "ggm": 0.7, "dog": 0.7, "st": 0.7, "hess": 0.7}
PRESMOOTH_WINDOW = 3.5  # OpPixelFeaturesPresmoothed.WINDOW_SIZE: presmoothing kernels reach 3.5 sigma
FEATURE_WINDOW = 2.0  # OpBaseFilter.window_size_feature: every feature's kernels reach 2 sigma
DOG_RATIO = 0.66  # OpDifferenceOfGaussians(sigma0=s, sigma1=0.66 s)
STRUCTURE_RATIO = 0.5  # OpStructureTensorEigenvalues(innerScale=s, outerScale=0.5 s)
ILASTIK_SET_VERSION = "ilastik-ff1"  # bump whenever this arithmetic changes


def ilastik_channel_names(scales: Sequence[float] = ILASTIK_SCALES) -> list[str]:
    """Channels of ``ilastik_features``: feature by feature (ilastik's order), scale by scale,
    only at the scales where ilastik offers the feature (``ILASTIK_MINIMUM_SCALE``)."""
    names = []
    for feature, channels in ILASTIK_FEATURES:
        for s in scales:
            if float(s) >= ILASTIK_MINIMUM_SCALE[feature]:
                suffixes = [""] if channels == 1 else [str(k + 1) for k in range(channels)]
                names.extend(f"{feature}{suffix}@{float(s):g}" for suffix in suffixes)
    return names


def fastfilters_kernel(order: int, sigma: float, window: float) -> np.ndarray:
    """fastfilters' 1-D Gaussian (derivative) kernel, taps -r..r, as correlation weights.

    fir_kernel.c: radius floor(window sigma + 0.5) (scipy's ``truncate``); order 0 normalised
    to sum 1; order 2 has its mean removed; orders 1 and 2 are then scaled so that they give
    exactly 1 on x (order 1) and x^2 / 2 (order 2), i.e. vigra's moment normalisation. Unlike
    scipy's ``gaussian_filter(order=...)``, whose truncated derivative kernels are not rescaled.
    """
    radius = int(np.floor(window * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    gauss = np.exp(-0.5 * x**2 / sigma**2)
    if order == 0:
        kernel = gauss / gauss.sum()
    elif order == 1:
        kernel = x * gauss
        kernel = kernel / np.sum(kernel * x)
    elif order == 2:
        kernel = (1 - x**2 / sigma**2) * gauss
        kernel = kernel - kernel.mean()
        kernel = kernel / np.sum(kernel * x**2 / 2)
    else:
        raise ValueError(f"fastfilters kernels have order 0, 1 or 2, not {order}")
    return kernel.astype(np.float32)  # fastfilters stores its coefficients as float


def _along_last(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate along the last (contiguous) axis, mirrored at the border (fastfilters'
    FF_BOUNDARY_MIRROR: d c b | a b c d), then transpose: the next call filters the other axis.

    Filtering only along the contiguous axis and transposing between the two passes is
    3-4x faster than scipy along axis 0 of a C-ordered slice; the values are the same.
    """
    out = ndimage.correlate1d(image, kernel, axis=-1, mode="mirror", output=np.float32)
    return np.ascontiguousarray(out.T)


def _gaussian(image: np.ndarray, sigma: float, window: float = FEATURE_WINDOW) -> np.ndarray:
    """Separable Gaussian smoothing (layout preserved: two passes, two transposes)."""
    kernel = fastfilters_kernel(0, sigma, window)
    return _along_last(_along_last(image, kernel), kernel)


def _descending_eigenvalues(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
    """Eigenvalues of [[a, b], [b, c]], larger first (fastfilters linalg.c _ev2d_default)."""
    mean = 0.5 * (a + c)
    radius = np.sqrt((0.5 * (a - c)) ** 2 + b * b)
    return [mean + radius, mean - radius]


def ilastik_scale(sigma: float) -> tuple[float, float]:
    """(presmoothing sigma, filter sigma) of one scale, as OpPixelFeaturesPresmoothed computes it.

    sigma > 1: presmoothed with sqrt(sigma^2 - 1), then every filter at scale 1 (together
    sigma). sigma <= 1: presmoothed with sigma itself *and* filtered at sigma: the source does
    so (``tempSigma = self.scales[j]`` beside ``newScales.append(self.scales[j])``), so the
    smoothing at 0.3, 0.7 and 1.0 is in effect sqrt(2) sigma.
    """
    sigma = float(sigma)
    return (float(np.sqrt(sigma**2 - 1.0)), 1.0) if sigma > 1.0 else (sigma, sigma)


def _ilastik_scale_features(image: np.ndarray, sigma: float) -> dict[str, list[np.ndarray]]:
    """ilastik's features of one scale that exist there, keyed by feature id, (H, W) each.

    Axis 0 is y, axis 1 x; which derivative is which does not matter (every feature is
    symmetric in the two axes and even in the sign of a first derivative).
    """
    presmooth, s = ilastik_scale(sigma)
    # image (H, W) -> presmoothed source, transposed (W, H): its last axis is y
    kernel = fastfilters_kernel(0, presmooth, PRESMOOTH_WINDOW)
    source_t = ndimage.correlate1d(_along_last(image, kernel), kernel, axis=-1, mode="mirror", output=np.float32)
    wanted = {feature for feature, _ in ILASTIK_FEATURES if sigma >= ILASTIK_MINIMUM_SCALE[feature]}
    k0, k1, k2 = (fastfilters_kernel(order, s, FEATURE_WINDOW) for order in (0, 1, 2))
    by_y = {0: _along_last(source_t, k0)}  # filtered along y, back to (H, W): x is the last axis

    def along_x(order_y: int, kernel_x: np.ndarray) -> np.ndarray:
        if order_y not in by_y:
            by_y[order_y] = _along_last(source_t, (k0, k1, k2)[order_y])
        return ndimage.correlate1d(by_y[order_y], kernel_x, axis=-1, mode="mirror", output=np.float32)

    out: dict[str, list[np.ndarray]] = {}
    if "gaussian" in wanted:
        out["gaussian"] = [along_x(0, k0)]
    if wanted & {"log", "hess"}:
        yy, xx = along_x(2, k0), along_x(0, k2)
    if "log" in wanted:  # fir_filters.c fastfilters_fir_laplacian2d: d2/dx2 + d2/dy2
        out["log"] = [yy + xx]
    if "ggm" in wanted:  # fastfilters_fir_gradmag2d: sqrt(dx^2 + dy^2)
        out["ggm"] = [np.sqrt(along_x(1, k0) ** 2 + along_x(0, k1) ** 2)]
    if "dog" in wanted:  # filterOperators.py differenceOfGausssiansFF: G(s) - G(0.66 s), both window 2
        narrow = fastfilters_kernel(0, DOG_RATIO * s, FEATURE_WINDOW)
        smaller = ndimage.correlate1d(_along_last(source_t, narrow), narrow, axis=-1, mode="mirror", output=np.float32)
        out["dog"] = [out["gaussian"][0] - smaller]
    if "st" in wanted:
        # ilastik asks fastfilters.structureTensorEigenvalues(innerScale=s, outerScale=0.5 s);
        # fastfilters' Python binding (core.cxx ConvolveST) passes them to the C function
        # fastfilters_fir_structure_tensor2d(in, sigma_outer, sigma_inner) in swapped order
        # (fastfilters' tests/test_vigra_compare.py compares ff(a, s2, s) with vigra(a, s, s2)),
        # so the gradient is taken at 0.5 s and the tensor is integrated at s.
        inner, outer = STRUCTURE_RATIO * s, s
        g0, g1 = fastfilters_kernel(0, inner, FEATURE_WINDOW), fastfilters_kernel(1, inner, FEATURE_WINDOW)
        smooth_y, deriv_y = _along_last(source_t, g0), _along_last(source_t, g1)
        d_x = ndimage.correlate1d(smooth_y, g1, axis=-1, mode="mirror", output=np.float32)
        d_y = ndimage.correlate1d(deriv_y, g0, axis=-1, mode="mirror", output=np.float32)
        out["st"] = _descending_eigenvalues(*(_gaussian(a, outer) for a in (d_y * d_y, d_y * d_x, d_x * d_x)))
    if "hess" in wanted:  # fastfilters_fir_hog2d: (k2, k0), (k1, k1), (k0, k2)
        out["hess"] = _descending_eigenvalues(yy, along_x(1, k1), xx)
    return out


def ilastik_features(image: np.ndarray, scales: Sequence[float] = ILASTIK_SCALES) -> np.ndarray:
    """(H, W) image to (C, H, W) float32: ilastik's pixel-classification features, every one
    ilastik offers at ``scales`` (the full selection), in ``ilastik_channel_names`` order.

    Computed as ilastik computes them with fastfilters (its default filter library): each
    scale presmoothed (``ilastik_scale``), then Gaussian smoothing, Laplacian of Gaussian,
    Gaussian gradient magnitude, difference of Gaussians, structure-tensor and
    Hessian-of-Gaussian eigenvalues (larger first), every kernel cut at 2 sigma (3.5 for the
    presmoothing) and mirrored at the image border. On a whole slice ilastik's blockwise
    halos change nothing, so this equals ilastik's output up to float rounding.
    """
    if image.ndim != 2:
        raise ValueError(f"ilastik_features takes one (H, W) image, got shape {image.shape}")
    scales = [float(s) for s in scales]
    if not scales or any(not np.isfinite(s) or s < ILASTIK_MINIMUM_SCALE["gaussian"] for s in scales):
        raise ValueError(f"ilastik scales must be numbers >= 0.3 (ilastik's smallest), got {scales}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    per_scale = [_ilastik_scale_features(image, s) for s in scales]
    channels = [
        channel for feature, _ in ILASTIK_FEATURES for features in per_scale for channel in features.get(feature, [])
    ]
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
