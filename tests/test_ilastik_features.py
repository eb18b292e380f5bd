"""ilastik's pixel-classification features, checked against their definitions written here
from scipy.ndimage and numpy, independently of ``backbones/filterbank.py``.

The definitions are ilastik's (lazyflow/operators/opPixelFeaturesPresmoothed.py and
filterOperators.py) with fastfilters' kernels (src/library/fir_kernel.c): every scale presmoothed
(sqrt(sigma^2 - 1) and then filters at 1 above sigma 1; sigma and filters at sigma up to 1),
presmoothing kernels cut at 3.5 sigma and feature kernels at 2 sigma, derivative kernels rescaled
to give exactly 1 on x (first order) and x^2/2 (second order, mean removed first), borders mirrored;
the structure tensor's gradient at half the filter scale and its integration at the filter scale
(fastfilters' binding swaps ilastik's innerScale and outerScale); DoG G(s) - G(0.66 s).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from em_foundation.backbones.filterbank import ILASTIK_SCALES, ilastik_channel_names, ilastik_features


def _image(shape=(70, 90), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = ndimage.zoom(rng.random((shape[0] // 10 + 1, shape[1] // 10 + 1)), 10, order=1)[: shape[0], : shape[1]]
    return (0.6 * coarse + 0.4 * rng.random(shape)).astype(np.float32)


def _kernel(order: int, sigma: float, truncate: float) -> np.ndarray:
    """scipy's sampled Gaussian derivative (as correlation weights), renormalised by its response."""
    radius = int(truncate * sigma + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1
    # correlation weights w[j] such that out[i] = sum_j w[j] in[i + j - radius]
    taps = ndimage.gaussian_filter1d(delta, sigma, order=order, truncate=truncate, mode="constant")[::-1]
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    if order == 2:
        taps = taps - taps.mean()
    if order:
        taps = taps / np.sum(taps * x**order / np.prod(np.arange(1, order + 1)))
    return taps


def _filter(image: np.ndarray, sigma: float, order_y: int, order_x: int, truncate: float = 2.0) -> np.ndarray:
    out = ndimage.correlate1d(image.astype(np.float64), _kernel(order_y, sigma, truncate), axis=0, mode="mirror")
    return ndimage.correlate1d(out, _kernel(order_x, sigma, truncate), axis=1, mode="mirror")


def _eigenvalues(a, b, c) -> np.ndarray:
    matrices = np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2)
    return np.linalg.eigvalsh(matrices)[..., ::-1]  # larger first


def _reference(image: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Every feature of one scale from the definition above."""
    presmooth, s = (np.sqrt(sigma**2 - 1), 1.0) if sigma > 1 else (sigma, sigma)
    source = ndimage.gaussian_filter(image.astype(np.float64), presmooth, truncate=3.5, mode="mirror")
    out = {"gaussian": ndimage.gaussian_filter(source, s, truncate=2.0, mode="mirror")}
    if sigma < 0.7:
        return out
    yy, xx, xy = _filter(source, s, 2, 0), _filter(source, s, 0, 2), _filter(source, s, 1, 1)
    out["log"] = yy + xx
    out["ggm"] = np.hypot(_filter(source, s, 1, 0), _filter(source, s, 0, 1))
    out["dog"] = out["gaussian"] - ndimage.gaussian_filter(source, 0.66 * s, truncate=2.0, mode="mirror")
    dy, dx = _filter(source, 0.5 * s, 1, 0), _filter(source, 0.5 * s, 0, 1)
    tensor = [ndimage.gaussian_filter(p, s, truncate=2.0, mode="mirror") for p in (dy * dy, dy * dx, dx * dx)]
    st, hess = _eigenvalues(*tensor), _eigenvalues(yy, xy, xx)
    out.update({"st1": st[..., 0], "st2": st[..., 1], "hess1": hess[..., 0], "hess2": hess[..., 1]})
    return out


def test_channels_follow_ilastiks_rules_for_which_feature_exists_at_which_scale() -> None:
    names = ilastik_channel_names()
    assert ILASTIK_SCALES == (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
    assert [n for n in names if n.endswith("@0.3")] == ["gaussian@0.3"]  # only smoothing at 0.3
    assert len(names) == 1 + 6 * (1 + 1 + 1 + 1 + 2 + 2) == 49
    assert names[:7] == [f"gaussian@{s:g}" for s in ILASTIK_SCALES]  # ilastik's feature-major order
    assert {"dog@10", "st1@10", "st2@10", "hess1@0.7", "hess2@0.7", "log@1", "ggm@5"} <= set(names)
    assert ilastik_features(_image((24, 24)), [0.3, 1.6]).shape == (1 + 8, 24, 24)


@pytest.mark.parametrize("sigma", ILASTIK_SCALES)
def test_each_feature_equals_its_definition(sigma: float) -> None:
    image = _image()
    features = ilastik_features(image, [sigma])
    names = ilastik_channel_names([sigma])
    for name, expected in _reference(image, sigma).items():
        got = features[names.index(f"{name}@{sigma:g}")]
        # float32 rounding: 1e-4 of the channel's spread, and for the differences of O(1)
        # smoothed values (DoG, LoG, the Hessian) their float32 cancellation
        cancellation = 3e-7 if name in ("dog", "log", "hess1", "hess2") else 0.0
        atol = 1e-4 * float(expected.std()) + cancellation
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol, err_msg=f"{name}@{sigma:g}")


def test_presmoothing_makes_the_scale_sigma_above_one_and_double_smooths_below() -> None:
    """G(1) of the sqrt(sigma^2 - 1)-presmoothed image is about G(sigma); at sigma <= 1 ilastik
    smooths twice (about G(sqrt(2) sigma)), as its source does."""
    image = _image((80, 80), seed=2)
    wide = ilastik_features(image, [3.5])[0]
    np.testing.assert_allclose(wide, ndimage.gaussian_filter(image, 3.5, mode="mirror"), atol=2e-3)
    narrow = ilastik_features(image, [0.7])[0]
    double = ndimage.gaussian_filter(image, 0.7 * np.sqrt(2), mode="mirror")
    assert np.abs(narrow - double).max() < np.abs(narrow - ndimage.gaussian_filter(image, 0.7, mode="mirror")).max()
