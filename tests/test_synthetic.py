"""The synthetic EM generator: deterministic, exact masks, two measurably different domains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from em_foundation.data.prepared import read_attrs, read_split, write_prepared
from em_foundation.data.registry import get_converter
from em_foundation.data.synthetic import DOMAINS, DomainStyle, convert_synthetic, generate_images

SIZE = 256  # smaller fields make the image statistics below too noisy to compare


@pytest.fixture(scope="module")
def batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {domain: generate_images(domain, 6, SIZE, SIZE, seed=3) for domain in DOMAINS}


def test_same_seed_same_images_other_seed_other_images() -> None:
    images, masks = generate_images("fibsem", 2, 64, 64, seed=5)
    again, masks_again = generate_images("fibsem", 2, 64, 64, seed=5)
    other, masks_other = generate_images("fibsem", 2, 64, 64, seed=6)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, masks_again)
    assert not np.array_equal(images, other)
    assert not np.array_equal(masks, masks_other)


def test_image_i_does_not_depend_on_how_many_are_drawn() -> None:
    few, few_masks = generate_images("sstem", 2, 64, 80, seed=1)
    many, many_masks = generate_images("sstem", 5, 64, 80, seed=1)
    np.testing.assert_array_equal(few, many[:2])
    np.testing.assert_array_equal(few_masks, many_masks[:2])


def test_streams_and_domains_do_not_share_scenes() -> None:
    _, train = generate_images("fibsem", 2, 64, 64, seed=0, stream=0)
    _, test = generate_images("fibsem", 2, 64, 64, seed=0, stream=1)
    _, sstem = generate_images("sstem", 2, 64, 64, seed=0, stream=0)
    assert not np.array_equal(train, test)
    assert not np.array_equal(train, sstem)


def test_dtypes_shapes_and_binary_masks(batches) -> None:
    for images, masks in batches.values():
        assert images.shape == masks.shape == (6, SIZE, SIZE)
        assert images.dtype == masks.dtype == np.uint8
        assert set(np.unique(masks)) <= {0, 1}
        assert images.std() > 10  # not a blank canvas


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_foreground_fraction_in_plausible_range(domain: str) -> None:
    _, masks = generate_images(domain, 8, 256, 256, seed=11)
    fractions = masks.mean(axis=(1, 2))
    assert np.all(fractions >= 0.03) and np.all(fractions <= 0.15), fractions


def test_masks_cover_exactly_the_membrane_bounded_objects(batches) -> None:
    """The dark double membrane lies just inside the mask; just outside it is cytoplasm."""
    for images, masks in batches.values():
        ring, core, band = [], [], []
        for image, mask in zip(images.astype(float), masks):
            inside = ndimage.distance_transform_edt(mask)
            outside = ndimage.distance_transform_edt(1 - mask)
            ring.append(image[(inside > 0) & (inside <= 2.5)].mean())
            core.append(image[inside > 4.5].mean())
            band.append(image[(outside > 1) & (outside <= 3)].mean())
        assert np.mean(ring) < np.mean(core) - 10
        assert np.mean(ring) < np.mean(band) - 20


def _best_threshold_iou(images: np.ndarray, masks: np.ndarray) -> float:
    """Foreground IoU of the best single global threshold, either polarity, pooled."""
    fg = masks.astype(bool)
    below_all = np.cumsum(np.bincount(images.ravel(), minlength=256))
    below_fg = np.cumsum(np.bincount(images[fg], minlength=256))
    n_fg, n_all = fg.sum(), images.size
    dark = below_fg / (n_fg + below_all - below_fg)
    bright_tp = n_fg - below_fg
    bright = bright_tp / (n_fg + (n_all - below_all) - bright_tp)
    return float(max(dark.max(), bright.max()))


def test_not_solvable_by_a_global_threshold(batches) -> None:
    for domain, (images, masks) in batches.items():
        assert _best_threshold_iou(images, masks) < 0.6, domain


def _high_pass_noise(images: np.ndarray) -> float:
    pixels = images.astype(float) / 255
    return float(np.std(pixels - ndimage.median_filter(pixels, size=(1, 3, 3))))


def _row_col_smoothness(images: np.ndarray) -> float:
    """Variance of vertical over horizontal differences: below 1 means smeared vertically.

    An isotropic pre-smoothing suppresses the (isotropic) noise, which would otherwise
    dominate the differences and hide the blur.
    """
    pixels = ndimage.gaussian_filter(images.astype(float), (0, 1.0, 1.0))
    return float(np.var(np.diff(pixels, axis=1)) / np.var(np.diff(pixels, axis=2)))


def _median_object_area(masks: np.ndarray) -> float:
    areas = []
    for mask in masks:
        labels, n = ndimage.label(mask)
        areas.extend(np.bincount(labels.ravel())[1:])
    return float(np.median(areas))


def test_domains_differ_measurably(batches) -> None:
    fib_images, fib_masks = batches["fibsem"]
    ss_images, ss_masks = batches["sstem"]
    assert _high_pass_noise(ss_images) > 1.3 * _high_pass_noise(fib_images)
    assert _row_col_smoothness(ss_images) < 0.85 < _row_col_smoothness(fib_images)
    assert _median_object_area(fib_masks) > 1.8 * _median_object_area(ss_masks)
    assert abs(ss_images.astype(float).std() - fib_images.astype(float).std()) > 5


def test_styles_are_frozen_and_complete() -> None:
    assert set(DOMAINS) == {"fibsem", "sstem"}
    style = DOMAINS["fibsem"]
    assert isinstance(style, DomainStyle)
    with pytest.raises(AttributeError):
        style.noise_std = 1.0  # type: ignore[misc]


def test_unknown_domain_is_named() -> None:
    with pytest.raises(ValueError, match="tem2"):
        generate_images("tem2", 1, 64, 64, seed=0)


def test_converter_splits_names_sources_and_attrs(tmp_path: Path) -> None:
    spec = {
        "converter": "synthetic",
        "options": {"domain": "sstem", "n_train": 3, "n_test": 2, "height": 64, "width": 96, "seed": 4},
    }
    assert get_converter("synthetic") is convert_synthetic
    splits, attrs = convert_synthetic(None, spec)
    assert set(splits) == {"train", "test"}
    assert splits["train"].raw.shape == (3, 64, 96) and splits["test"].raw.shape == (2, 64, 96)
    assert splits["train"].names == ["0", "1", "2"] and splits["test"].names == ["0", "1"]
    assert splits["test"].sources == ["synthetic:sstem:test:0", "synthetic:sstem:test:1"]
    assert not np.array_equal(splits["train"].raw[:2], splits["test"].raw)
    images, _ = generate_images("sstem", 3, 64, 96, seed=4)
    np.testing.assert_array_equal(splits["train"].raw, images)
    assert attrs["voxel_size_nm"] == [4.6, 4.6, 50.0]
    assert attrs["licence"] == "CC0 (generated)"
    assert attrs["citation"] == "synthetic, em_foundation.data.synthetic"
    assert attrs["domain"] == "sstem"
    assert attrs["style"]["blur_sigma"] == list(DOMAINS["sstem"].blur_sigma)

    path = tmp_path / "synthetic.h5"
    write_prepared(path, splits, attrs)
    stored = read_attrs(path)
    assert json.loads(stored["style"]) == attrs["style"]
    np.testing.assert_array_equal(read_split(path, "test").labels, splits["test"].labels)


def test_converter_defaults() -> None:
    splits, attrs = convert_synthetic(None, {"converter": "synthetic", "options": {"domain": "fibsem"}})
    assert splits["train"].raw.shape == (12, 256, 256) and len(splits["test"]) == 4
    assert attrs["voxel_size_nm"] == [5.0, 5.0, 5.0]


@pytest.mark.parametrize(
    "options, message",
    [({}, "domain"), ({"domain": "fibsem", "n_trian": 3}, "n_trian"), ({"domain": "x"}, "'x'")],
)
def test_converter_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_synthetic(None, {"converter": "synthetic", "options": options})


def test_converter_rejects_an_archive(tmp_path: Path) -> None:
    spec = {"converter": "synthetic", "options": {"domain": "fibsem", "n_train": 1, "n_test": 1}}
    with pytest.raises(ValueError, match="synthetic"):
        convert_synthetic(tmp_path / "archive.zip", spec)
