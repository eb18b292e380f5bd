"""Intervals over test images that hold on serial sections, and paired differences of two models."""

import numpy as np
import pytest

from em_foundation.evaluation.bootstrap import (
    ImageBootstrap,
    PairedSample,
    automatic_block_length,
    image_interval,
    paired_difference,
    pooled_iou,
)


def ar1(rng, n, phi):
    x = np.empty(n)
    x[0] = rng.normal() / np.sqrt(1 - phi**2)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + rng.normal()
    return x * np.sqrt(1 - phi**2)  # unit variance


def serial_counts(rng, n=165, phi=0.7, mean=0.6, sd=0.08):
    """(1, n, 3) TP, FP, FN of n serial sections whose IoU follows an AR(1) around ``mean``
    (100 pixels of truth-or-prediction each, so the pooled IoU is the mean per-section IoU)."""
    tp = 100 * (mean + sd * ar1(rng, n, phi))
    rest = 100 - tp
    return np.stack([tp, rest / 2, rest / 2], axis=-1)[None]


def coverage(block_length, phi=0.7, repeats=100):
    covered = 0
    for r in range(repeats):
        counts = serial_counts(np.random.default_rng(r), phi=phi)
        boot = ImageBootstrap(n_boot=300, seed=r, block_length=block_length)
        interval = image_interval([(counts, np.array(["lucchi"] * counts.shape[1]))], boot)
        covered += interval.low <= 0.6 <= interval.high
    return covered / repeats


def test_block_bootstrap_covers_the_true_mean_of_an_autocorrelated_series():
    """165 sections (Lucchi++'s test stack) with lag-1 correlation 0.7: the interval from blocks
    of consecutive sections covers the true mean in >= 90 % of 100 series; resampling the
    sections one by one (block length 1, the bootstrap of main before this change) does not."""
    assert coverage(None) >= 0.90
    assert coverage(1) < 0.75


def test_block_length_comes_from_the_series():
    rng = np.random.default_rng(0)
    assert automatic_block_length(rng.normal(size=200)) <= 3
    assert automatic_block_length(ar1(rng, 200, 0.9)) >= 8
    assert automatic_block_length([0.5] * 30) == 1


def test_too_few_test_images_give_no_interval_and_say_so():
    counts = serial_counts(np.random.default_rng(0), n=3)
    interval = image_interval([(counts, np.array(["vnc"] * 3))], ImageBootstrap(n_boot=100))
    assert np.isnan(interval.low) and np.isnan(interval.high)
    assert interval.note == "too few test images (3 < 10)"
    lower = image_interval([(counts, np.array(["vnc"] * 3))], ImageBootstrap(n_boot=100, min_images=3))
    assert np.isfinite(lower.low) and lower.note == ""


def paired_models(rng, n, gain, seeds=3):
    """Two models on the same n images whose difficulty varies much more than the models differ."""
    difficulty = rng.uniform(0.2, 0.9, n)
    truth = 100.0

    def runs(shift):
        iou = np.clip(difficulty[None] + shift + 0.01 * rng.normal(size=(seeds, n)), 0.01, 0.99)
        tp = truth * iou
        return np.stack([tp, (truth - tp) / 2, (truth - tp) / 2], axis=-1)

    return runs(gain), runs(0.0)


def test_paired_difference_is_the_difference_of_seed_means_with_a_paired_interval():
    rng = np.random.default_rng(1)
    a, b = paired_models(rng, 40, 0.03)
    strata = np.array(["lucchi"] * 40)
    result = paired_difference(PairedSample(a, b, strata), ImageBootstrap(n_boot=500, seed=0))
    mean = lambda runs: pooled_iou(runs.sum(axis=1)).mean()  # noqa: E731
    assert result.difference == pytest.approx(mean(a) - mean(b))
    assert 0 < result.low < 0.03 < result.high, "the paired interval excludes 0 and holds the true gain"
    # Each model's own interval is far wider than the gain: only pairing resolves it.
    alone = image_interval([(b, strata)], ImageBootstrap(n_boot=500, seed=0))
    assert alone.high - alone.low > 3 * (result.high - result.low)
    assert (result.n_images, result.n_runs_a, result.n_runs_b, result.note) == (40, 3, 3, "")
    again = paired_difference(PairedSample(a, b, strata), ImageBootstrap(n_boot=500, seed=0))
    other = paired_difference(PairedSample(a, b, strata), ImageBootstrap(n_boot=500, seed=1))
    assert (again.low, again.high) == (result.low, result.high) and other.low != result.low


def test_paired_difference_covers_the_true_difference():
    covered = 0
    for r in range(40):
        rng = np.random.default_rng(100 + r)
        a, b = paired_models(rng, 30, 0.02, seeds=2)
        result = paired_difference(PairedSample(a, b, np.array(["x"] * 30)), ImageBootstrap(n_boot=300, seed=r))
        covered += result.low <= 0.02 <= result.high
    assert covered / 40 >= 0.9


def test_paired_difference_over_folds_and_with_too_few_images():
    rng = np.random.default_rng(2)
    folds = [PairedSample(*paired_models(rng, 4, 0.05), np.array(["vnc"] * 4)) for _ in range(5)]
    pooled = paired_difference(folds, ImageBootstrap(n_boot=300))
    assert pooled.n_images == 20 and pooled.n_runs_a == 15 and pooled.low < pooled.difference < pooled.high
    one_fold = paired_difference(folds[0], ImageBootstrap(n_boot=300))
    assert np.isnan(one_fold.low) and one_fold.note == "too few test images (4 < 10)"
    assert np.isfinite(one_fold.difference)
    with pytest.raises(ValueError, match=r"\(n_runs, n_images, k\) for 4 images"):
        paired_difference(PairedSample(folds[0].a[:, :3], folds[0].b, folds[0].strata))
