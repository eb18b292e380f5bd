"""Per-domain intensity normalisation of raw uint8 EM slices (see "Beyond the study" in docs/published-setup.md).

Two monotone grey-level maps, one per dataset split, applied before the backbone:

* ``percentile_normalise`` stretches the [low, high] percentiles of a dataset's pooled
  intensities to [0, 255] (values outside clipped), removing differences in brightness and
  contrast between microscopes and stains.
* ``histogram_match`` maps a dataset's pooled intensity distribution onto a reference
  domain's (CDF / quantile mapping, what ``skimage.exposure.match_histograms`` does for one
  image, here pooled over the whole split), removing differences in the shape of the
  distribution too. The reference can be stored as a short quantile table
  (``reference_quantiles``, JSON-ready) instead of its images.

Why percentiles over the whole split by default, not per image
--------------------------------------------------------------
The shift to correct is between *datasets* (instrument, staining, section thickness):
it is a property of the dataset, so one map per dataset is the right granularity. A single
shared monotone map keeps every relation between the slices of a stack intact, whereas a
per-image stretch treats each slice's content as if it were its acquisition: a slice with
few mitochondria or a large bright region is stretched differently from its neighbours,
the same membrane gets different grey levels in adjacent slices, and percentiles of one
slice are noisier than those of a whole split. ``per_image=True`` is offered for data
whose brightness really does drift from slice to slice.

Statistics come from the split being normalised; for a test split that is transductive
(it uses the test images, never their labels). ``bounds=`` lets a caller reuse the
training split's percentiles instead.

All maps are 256-entry lookup tables computed from a streamed grey-level histogram, so
memory stays at the size of the uint8 input (np.percentile on 130 M pixels would first
copy them to float64).
"""

from __future__ import annotations

import numpy as np

GREY_LEVELS = 256


def _check_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8, got {images.dtype}")
    if images.size == 0:
        raise ValueError(f"{what} are empty")
    return images


def intensity_histogram(images: np.ndarray) -> np.ndarray:
    """Counts of each of the 256 grey levels over all pixels (int64), streamed slice by slice."""
    images = _check_uint8(images)
    if images.ndim < 3:
        return np.bincount(images.reshape(-1), minlength=GREY_LEVELS).astype(np.int64)
    counts = np.zeros(GREY_LEVELS, dtype=np.int64)
    for image in images:
        counts += np.bincount(image.reshape(-1), minlength=GREY_LEVELS)
    return counts


def _percentiles_from_histogram(counts: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """np.percentile(values, percentiles) (linear method) from the values' histogram, exactly."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    position = np.asarray(percentiles, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    # the value at sorted index j is the first grey level whose cumulative count exceeds j
    value_below = np.searchsorted(cumulative, below, side="right").astype(np.float64)
    value_above = np.searchsorted(cumulative, above, side="right").astype(np.float64)
    return value_below + (position - below) * (value_above - value_below)


def intensity_bounds(images: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of all pixels pooled (equal to np.percentile's)."""
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got {low}, {high}")
    lo, hi = _percentiles_from_histogram(intensity_histogram(images), np.array([low, high]))
    return float(lo), float(hi)


def _stretch_table(lo: float, hi: float) -> np.ndarray:
    # At least one grey level of range, so a (nearly) constant domain is not blown up into
    # a hard threshold at a fraction of a grey level.
    span = max(hi - lo, 1.0)
    levels = np.arange(GREY_LEVELS, dtype=np.float64)
    return np.rint(np.clip((levels - lo) / span, 0.0, 1.0) * 255.0).astype(np.uint8)


def percentile_normalise(
    images: np.ndarray,
    low: float = 1.0,
    high: float = 99.0,
    per_image: bool = False,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Stretch the [low, high] percentiles to [0, 255], clipping outside; uint8 in, uint8 out.

    ``per_image=False`` (default): one map for the whole array (a dataset split), see the
    module docstring for why. ``per_image=True``: each (H, W) slice by its own percentiles.
    ``bounds=(lo, hi)``: use these grey levels instead of computing percentiles (e.g. the
    training split's, from ``intensity_bounds``); not combined with ``per_image``.
    """
    images = _check_uint8(images)
    if bounds is not None:
        if per_image:
            raise ValueError("bounds and per_image=True exclude each other")
        return _stretch_table(*bounds)[images]
    if per_image:
        if images.ndim < 3:
            return _stretch_table(*intensity_bounds(images, low, high))[images]
        return np.stack([_stretch_table(*intensity_bounds(image, low, high))[image] for image in images])
    return _stretch_table(*intensity_bounds(images, low, high))[images]


def _cdf_table(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(X <= v), v) for every grey level v that occurs: the distribution's quantile curve."""
    counts = intensity_histogram(images)
    present = np.flatnonzero(counts)
    cdf = np.cumsum(counts)[present] / counts.sum()
    return cdf, present.astype(np.float64)


def reference_quantiles(images: np.ndarray, n_quantiles: int = GREY_LEVELS) -> np.ndarray:
    """Grey levels of the pooled reference distribution at quantile levels linspace(0, 1, n).

    The curve sampled is the one ``histogram_match`` interpolates on (grey level v at
    cumulative fraction P(X <= v), linear in between), so matching to the stored table
    reproduces matching to the images to about a grey level wherever the curve is not
    steep; in sparse tails (many grey levels within the first or last 1/(n-1) of the
    pixels) it is coarser, which touches that small fraction of pixels only. Raise n to
    tighten it. Store with ``.tolist()`` in JSON; the levels are implied by its length.
    """
    if n_quantiles < 2:
        raise ValueError(f"n_quantiles must be at least 2, got {n_quantiles}")
    cdf, values = _cdf_table(images)
    return np.interp(np.linspace(0.0, 1.0, n_quantiles), cdf, values)


def histogram_matching_table(
    images: np.ndarray,
    reference_images: np.ndarray | None = None,
    *,
    quantiles: np.ndarray | None = None,
) -> np.ndarray:
    """The 256-entry uint8 lookup table ``histogram_match`` applies (monotone non-decreasing)."""
    if (reference_images is None) == (quantiles is None):
        raise ValueError("give exactly one of reference_images and quantiles")
    if reference_images is not None:
        reference_levels, reference_values = _cdf_table(_check_uint8(reference_images, "reference images"))
    else:
        reference_values = np.asarray(quantiles, dtype=np.float64).reshape(-1)
        if reference_values.size < 2 or np.any(np.diff(reference_values) < 0):
            raise ValueError("quantiles must be a non-decreasing table of at least 2 grey levels")
        reference_levels = np.linspace(0.0, 1.0, reference_values.size)
    counts = intensity_histogram(images)
    source_cdf = np.cumsum(counts) / counts.sum()
    table = np.interp(source_cdf, reference_levels, reference_values)
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


def histogram_match(
    images: np.ndarray,
    reference_images: np.ndarray | None = None,
    *,
    quantiles: np.ndarray | None = None,
) -> np.ndarray:
    """Map the pooled intensity distribution of ``images`` onto a reference domain's.

    Grey level v goes to the reference's grey level at the same cumulative fraction
    P(X <= v) (linear interpolation of the reference's quantile curve), as
    ``skimage.exposure.match_histograms`` does, but with one map for the whole array rather
    than per image. The reference is either its images (``reference_images``) or their
    ``reference_quantiles`` table (``quantiles=``). The map is monotone, so the order of
    grey levels (ranks) is kept; ties can merge, never swap.
    """
    images = _check_uint8(images)
    return histogram_matching_table(images, reference_images, quantiles=quantiles)[images]
