"""The filter-bank baseline backbone: shapes, agreement with scipy, determinism, identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from em_foundation.backbones import FAMILIES, build_backbone
from em_foundation.backbones.filterbank import (
    DEFAULT_SIGMAS,
    FILTERS_PER_SCALE,
    FilterBankBackbone,
    channel_names,
    pixel_features,
    pool_to_grid,
)
from em_foundation.grid import FAMILY_DEFAULT_PATCH, patch_size_of


def _images(batch: int = 2, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.rand(batch, 1, height // 8, width // 8, generator=generator)
    coarse = torch.nn.functional.interpolate(smooth, size=(height, width), mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(batch, 1, height, width, generator=generator)).clamp(0, 1)


def _pool(image: np.ndarray, p: int) -> np.ndarray:
    return pool_to_grid(image[None].astype(np.float32), p)[0]


@pytest.fixture(scope="module")
def backbone() -> FilterBankBackbone:
    return build_backbone({"family": "filterbank", "options": {}})


def test_registered_and_defaults(backbone) -> None:
    assert "filterbank" in FAMILIES
    assert backbone.family == "filterbank"
    assert backbone.patch_size == FAMILY_DEFAULT_PATCH["filterbank"] == patch_size_of({"family": "filterbank"})
    assert backbone.sigmas == tuple(DEFAULT_SIGMAS)
    assert backbone.embed_dim == 1 + len(FILTERS_PER_SCALE) * len(DEFAULT_SIGMAS)
    assert list(backbone.parameters()) == []


def test_patch_size_option_agrees_with_the_grid() -> None:
    spec = {"family": "filterbank", "options": {"patch_size": 16, "sigmas": [1.0]}}
    built = build_backbone(spec)
    assert built.patch_size == patch_size_of(spec) == 16
    assert built(_images(1, 32, 48)).grid.shape == (1, 1 + len(FILTERS_PER_SCALE), 2, 3)


def test_grid_and_pooled_shapes(backbone) -> None:
    images = _images(3, 48, 64)
    with torch.inference_mode():
        out = backbone(images)
    p = backbone.patch_size
    assert out.grid.shape == (3, backbone.embed_dim, 48 // p, 64 // p)
    assert out.grid.dtype == out.pooled.dtype == torch.float32
    assert out.grid.device == images.device
    assert out.pooled.shape == (3, backbone.embed_dim)
    torch.testing.assert_close(out.pooled, out.grid.mean(dim=(2, 3)))
    assert torch.isfinite(out.grid).all()
    assert len(backbone.describe()["channels"]) == backbone.embed_dim


def test_channels_match_scipy(backbone) -> None:
    image = _images(1, 48, 64, seed=3)[0, 0].numpy().astype(np.float64)
    grid = backbone(torch.from_numpy(image)[None, None].float()).grid[0].numpy()
    names = backbone.channel_names
    p = backbone.patch_size
    np.testing.assert_allclose(grid[names.index("raw")], _pool(image, p), atol=1e-5)
    for sigma in DEFAULT_SIGMAS:
        expected = {
            "gaussian": ndimage.gaussian_filter(image, sigma),
            "log": ndimage.gaussian_laplace(image, sigma),
            "ggm": ndimage.gaussian_gradient_magnitude(image, sigma),
        }
        for name, reference in expected.items():
            np.testing.assert_allclose(
                grid[names.index(f"{name}@{sigma:g}")], _pool(reference, p), atol=1e-4, err_msg=name
            )


def test_hessian_and_structure_tensor_eigenvalues() -> None:
    """Compare with numpy's eigvalsh on matrices assembled independently from scipy filters."""
    image = _images(1, 40, 40, seed=5)[0, 0].numpy().astype(np.float64)
    sigma = 1.6
    features = pixel_features(image.astype(np.float32), [sigma])
    names = channel_names([sigma])
    d = {
        order: ndimage.gaussian_filter(image, sigma, order=order) for order in [(2, 0), (1, 1), (0, 2), (1, 0), (0, 1)]
    }
    hessian = np.stack([np.stack([d[2, 0], d[1, 1]], -1), np.stack([d[1, 1], d[0, 2]], -1)], -2)
    gr, gc = d[1, 0], d[0, 1]
    tensor = [ndimage.gaussian_filter(a, 2 * sigma) for a in (gr * gr, gr * gc, gc * gc)]
    structure = np.stack([np.stack(tensor[:2], -1), np.stack(tensor[1:], -1)], -2)
    for label, matrices in (("hess", hessian), ("st", structure)):
        eig = np.linalg.eigvalsh(matrices)[..., ::-1]  # descending
        for k in (0, 1):
            np.testing.assert_allclose(features[names.index(f"{label}{k + 1}@{sigma:g}")], eig[..., k], atol=1e-4)
    assert np.all(features[names.index("hess1@1.6")] >= features[names.index("hess2@1.6")])


def test_features_respond_to_structure() -> None:
    """A dark line gives a strongly positive top Hessian eigenvalue on it (a ridge detector)."""
    image = np.full((32, 32), 0.8, dtype=np.float32)
    image[:, 15:17] = 0.2
    features = pixel_features(image, [1.0])
    top = features[channel_names([1.0]).index("hess1@1")]
    assert top[:, 15:17].mean() > 10 * np.abs(top[:, :8]).mean() + 1e-3


def test_deterministic() -> None:
    images = _images(2, 32, 32, seed=1)
    torch.manual_seed(0)
    first = build_backbone({"family": "filterbank"})(images)
    torch.manual_seed(7)
    second = build_backbone({"family": "filterbank"})(images)
    torch.testing.assert_close(first.grid, second.grid, rtol=0, atol=0)
    assert not torch.equal(first.grid, build_backbone({"family": "filterbank"})(_images(2, 32, 32, seed=2)).grid)


@pytest.mark.parametrize("shape", [(1, 1, 30, 32), (1, 1, 32, 36)])
def test_rejects_sizes_not_multiple_of_patch(backbone, shape) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        backbone(torch.rand(shape))


def test_rejects_colour_input(backbone) -> None:
    with pytest.raises(ValueError, match="grayscale"):
        backbone(torch.rand(1, 3, 32, 32))


def test_identity_names_filters_and_scales() -> None:
    base = build_backbone({"family": "filterbank", "options": {"sigmas": [1.0, 2.0]}})
    same = build_backbone({"family": "filterbank", "options": {"sigmas": [1.0, 2.0]}})
    other_scales = build_backbone({"family": "filterbank", "options": {"sigmas": [1.0, 2.5]}})
    other_patch = build_backbone({"family": "filterbank", "options": {"sigmas": [1.0, 2.0], "patch_size": 16}})
    assert base.identity == same.identity
    assert len({base.identity, other_scales.identity, other_patch.identity}) == 3
    assert "2.5" in other_scales.identity and all(name in base.identity for name in FILTERS_PER_SCALE)
    assert base.describe()["weights_identity"] == base.identity


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sigmas": []}, "sigmas"),
        ({"sigmas": [1.0, -1.0]}, "sigmas"),
        ({"scales": [1.0]}, "scales"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_rejects_bad_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone({"family": "filterbank", "options": options})


def test_no_imagenet_normalisation(backbone) -> None:
    described = backbone.describe()
    assert described["mean"] == [0.0, 0.0, 0.0] and described["std"] == [1.0, 1.0, 1.0]


def test_filter_bank_cache_stores_float32_so_tiny_channels_survive(tmp_path) -> None:
    """Structure-tensor channels with sd about 1e-6 are subnormal in float16 (errors of percents
    of their sd); the filter bank's Family.token_dtype keeps them float32, a ViT cache float16."""
    from em_foundation.families import FAMILIES
    from em_foundation.feature_cache import read_tokens
    from tests.helpers import TINY_VIT, make_dataset

    assert FAMILIES["filterbank"].token_dtype == "float32" and FAMILIES["dinov2"].token_dtype == "float16"
    paths = make_dataset(tmp_path, "fb", "fibsem", n_train=2, n_test=1, size=112)
    tokens = read_tokens(paths["features"], "train")
    assert tokens.dtype == np.float32
    from em_foundation.data.tiles import read_tiles
    from em_foundation.feature_cache import to_unit_float

    raw = read_tiles(paths["tiles"], "train").raw[:2]
    expected = build_backbone({"family": "filterbank", "options": {"patch_size": 8}})(to_unit_float(raw)).grid.numpy()
    np.testing.assert_array_equal(tokens[:2], expected)  # stored exactly
    smallest = expected.std(axis=(0, 2, 3)).argmin()
    as_half = expected[:, smallest].astype(np.float16).astype(np.float32)
    assert np.abs(as_half - expected[:, smallest]).max() > 0  # what float16 would have lost
    vit = make_dataset(tmp_path, "vit", "fibsem", n_train=2, n_test=1, size=112, backbone=TINY_VIT)
    assert read_tokens(vit["features"], "train").dtype == np.float16
