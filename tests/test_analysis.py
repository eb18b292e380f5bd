"""Tests of the domain-analysis science (em_foundation.analysis): numpy only, no torch.

Tolerances are either analytic (rounding of float64 linear algebra) or derived from the
sampling error of the estimator under test, as each test says. All data are seeded, so a
failure is a change in behaviour, not bad luck.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from em_foundation.analysis import (
    analyse_domains,
    dataset_probe,
    effective_dim,
    frechet_bootstrap,
    frechet_distance,
    frechet_gaussian,
    frechet_permutation,
    mahalanobis_ood,
    pca_2d,
    sample_patch_tokens,
    umap_2d,
)

VARIANTS = [
    {"shrinkage": None, "pca_dim": None},
    {"shrinkage": "ledoit_wolf", "pca_dim": None},
    {"shrinkage": None, "pca_dim": 8},
]


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random, well-conditioned symmetric positive-definite matrix (known covariance)."""
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return a @ a.T + 0.5 * np.eye(d)


def _fd_direct(x: np.ndarray, y: np.ndarray) -> float:
    """FD from sample moments, with Tr((S1 S2)^{1/2}) from eigenvalues, not sqrtm.

    S1 S2 is similar to a PSD matrix, so its eigenvalues are real and non-negative and the
    trace of its square root is the sum of their square roots: independent of scipy's sqrtm.
    """
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2).real
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


# --------------------------------------------------------------------------- Fréchet


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_gaussian_diagonal_closed_form(method):
    """For diagonal covariances FD = sum (mu1-mu2)^2 + sum (sqrt(s1) - sqrt(s2))^2 exactly."""
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.2, 3.0, size=d), rng.uniform(0.2, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_gaussian(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_gaussian_methods_agree_on_full_covariances():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    a = frechet_gaussian(mu1, s1, mu2, s2, method="sqrtm")
    b = frechet_gaussian(mu1, s1, mu2, s2, method="eigh")
    assert a == pytest.approx(b, rel=1e-9)
    with pytest.raises(ValueError, match="unknown method"):
        frechet_gaussian(mu1, s1, mu2, s2, method="nope")


def test_frechet_samples_match_direct_computation():
    """The estimator equals the FD of the sample moments (ddof=1), computed independently."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 10))
    y = rng.normal(size=(150, 10)) @ _spd(rng, 10) + 0.5
    assert frechet_distance(x, y) == pytest.approx(_fd_direct(x, y), rel=1e-8)


@pytest.mark.parametrize("diagonal", [False, True])
def test_frechet_samples_converge_to_population_value(diagonal):
    """Large-n samples from known Gaussians give the population FD within sampling error.

    Tolerance: 4 bootstrap standard deviations of the estimate (the bootstrap SD estimates
    the estimator's sampling SD; 4 SD is a < 1e-4 two-sided miss under normality). The
    estimator's bias, O(d/n) = O(1e-3) here, is far smaller than that SD.
    """
    rng = np.random.default_rng(4)
    d, n = 4, 20000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    if diagonal:
        v1, v2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 1.0, 0.25])
        s1, s2 = np.diag(v1), np.diag(v2)
        truth = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    else:
        s1, s2 = _spd(rng, d), _spd(rng, d)
        truth = frechet_gaussian(mu1, s1, mu2, s2)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    res = frechet_bootstrap(x, y, n_boot=40, seed=0)
    assert abs(res["value"] - truth) < 4 * res["boot_std"]
    # and the tolerance is meaningful: much smaller than the quantity itself
    assert 4 * res["boot_std"] < 0.2 * truth


@pytest.mark.parametrize("kw", VARIANTS)
def test_frechet_self_distance_is_zero_and_symmetric(kw):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 16))
    y = rng.normal(size=(40, 16)) * 1.5 + 1.0
    scale = 2 * np.trace(np.cov(x, rowvar=False))
    # Self distance: zero up to float64 rounding in a matrix square root (relative 1e-6).
    assert abs(frechet_distance(x, x, **kw)) < 1e-6 * scale
    assert frechet_distance(x, y, **kw) == pytest.approx(frechet_distance(y, x, **kw), rel=1e-7)
    assert frechet_distance(x, y, **kw) > 0


def test_frechet_when_fewer_samples_than_dimensions():
    """n < d: the full covariance is singular; all variants still return finite values."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 256))
    y = rng.normal(size=(10, 256)) + 0.3
    full = frechet_distance(x, y)
    lw = frechet_distance(x, y, shrinkage="ledoit_wolf")
    pca = frechet_distance(x, y, pca_dim=8)
    assert np.isfinite(full) and np.isfinite(lw) and np.isfinite(pca)
    # The full value is still the right arithmetic on the singular sample covariances:
    # Tr((S1 S2)^{1/2}) = nuclear norm of A B^T / sqrt((n1-1)(n2-1)), A, B centred data.
    a, b = x - x.mean(0), y - y.mean(0)
    tr = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(9 * 9)
    diff = x.mean(0) - y.mean(0)
    exact = diff @ diff + np.trace(np.cov(x, rowvar=False)) + np.trace(np.cov(y, rowvar=False)) - 2 * tr
    assert full == pytest.approx(exact, rel=1e-6)
    assert frechet_distance(x, y, method="eigh") == pytest.approx(exact, rel=1e-6)
    # A PCA with at least n1 + n2 - 1 components keeps all the pooled variance, hence equals full.
    assert effective_dim(10, 10, 256, 64) == 19
    assert frechet_distance(x, y, pca_dim=64) == pytest.approx(full, rel=1e-6)


def test_frechet_rejects_bad_input():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError):
        frechet_distance(rng.normal(size=(5, 3)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(rng.normal(size=(1, 3)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="shrinkage"):
        frechet_distance(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), shrinkage="oas")


def test_frechet_bootstrap_interval_and_counts():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 5))
    y = rng.normal(size=(250, 5)) + 1.0
    res = frechet_bootstrap(x, y, n_boot=100, seed=0)
    assert res["ci_low"] <= res["value"] <= res["ci_high"]
    assert res["ci_low"] < res["ci_high"]
    assert (res["n_x"], res["n_y"], res["dim"], res["n_boot"]) == (300, 250, 5, 100)
    # Seeded: the same call gives the same interval.
    again = frechet_bootstrap(x, y, n_boot=100, seed=0)
    assert (again["ci_low"], again["ci_high"]) == (res["ci_low"], res["ci_high"])
    pca = frechet_bootstrap(x, y, n_boot=20, seed=0, pca_dim=3)
    assert pca["dim"] == 3


def test_frechet_small_n_interval_brackets_the_bias_corrected_estimate():
    """n = 10 in d = 8, true FD = 1: the percentile interval lies above the plain estimate;
    the bias-corrected estimate is nearer the truth and its basic interval contains it and the truth."""
    rng = np.random.default_rng(0)
    d = 8
    for _ in range(2):  # the same generator's second draw is the n = 10 case below
        x, y = rng.normal(size=(6 if _ == 0 else 10, d)), rng.normal(size=(6 if _ == 0 else 10, d))
    y = y + np.r_[1.0, np.zeros(d - 1)]
    truth = 1.0
    percentile = frechet_bootstrap(x, y, n_boot=200, seed=0, interval="percentile")
    assert percentile["ci_low"] > percentile["value"], "the case this guards against: interval excludes its estimate"
    res = frechet_bootstrap(x, y, n_boot=200, seed=0)
    assert res["interval"] == "basic" and res["value"] == percentile["value"]
    assert res["ci_low"] <= res["value_debiased"] <= res["ci_high"]
    assert res["ci_low"] <= truth <= res["ci_high"]
    assert abs(res["value_debiased"] - truth) < abs(res["value"] - truth)
    assert (res["pct_low"], res["pct_high"]) == (percentile["ci_low"], percentile["ci_high"])
    with pytest.raises(ValueError, match="interval"):
        frechet_bootstrap(x, y, n_boot=5, interval="bca")


def test_frechet_cluster_bootstrap_counts_groups():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) + 1
    gx, gy = np.repeat(np.arange(10), 4), np.repeat(np.arange(6), 5)
    res = frechet_bootstrap(x, y, n_boot=20, seed=0, groups_x=gx, groups_y=gy)
    assert (res["n_groups_x"], res["n_groups_y"]) == (10, 6)
    assert np.isfinite(res["ci_low"]) and np.isfinite(res["ci_high"])
    perm = frechet_permutation(x, y, n_perm=20, seed=0, groups_x=gx, groups_y=gy)
    assert 0 < perm["p_value"] <= 1


def test_frechet_permutation_null():
    """Same distribution: the observed FD is typical of the null; shifted: beyond all of it."""
    rng = np.random.default_rng(10)
    n_perm = 50
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(30, 8))
    same = frechet_permutation(x, y, n_perm=n_perm, seed=0)
    assert same["p_value"] > 0.05
    shifted = frechet_permutation(x, y + 2.0, n_perm=n_perm, seed=0)
    assert shifted["p_value"] == pytest.approx(1 / (1 + n_perm))
    assert shifted["value"] > shifted["null_q95"]


# --------------------------------------------------------------------------- probe


def test_probe_at_chance_on_one_distribution():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 20))
    y = np.repeat(["a", "b"], 100)
    res = dataset_probe(x, y, pca_dim=8, seed=0)
    assert abs(res["balanced_accuracy_mean"] - 0.5) < 0.15
    assert abs(res["roc_auc_mean"] - 0.5) < 0.15
    assert res["chance_balanced_accuracy"] == 0.5
    assert res["n_per_class"] == {"a": 100, "b": 100}
    assert res["n_splits"] == 5 and len(res["roc_auc_folds"]) == 5


def test_probe_separates_shifted_distributions():
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.normal(size=(100, 20)), rng.normal(size=(20, 20)) + 1.5])
    y = np.array(["lucchi"] * 100 + ["vnc"] * 20)
    res = dataset_probe(x, y, seed=0)  # pca_dim 64 is capped at d = 20
    assert res["balanced_accuracy_mean"] > 0.95
    assert res["roc_auc_mean"] > 0.98
    assert res["pca_components"] == 20
    assert res["n_per_class"] == {"lucchi": 100, "vnc": 20}


def test_probe_multiclass_uses_one_vs_rest_auc():
    rng = np.random.default_rng(13)
    centres = np.eye(10)[:3] * 4
    x = np.concatenate([rng.normal(size=(30, 10)) + c for c in centres])
    y = np.repeat(["a", "b", "c"], 30)
    res = dataset_probe(x, y, pca_dim=5, seed=0)
    assert res["chance_balanced_accuracy"] == pytest.approx(1 / 3)
    assert res["roc_auc_mean"] > 0.95 and res["balanced_accuracy_mean"] > 0.9


def test_probe_reduces_folds_to_smallest_class_and_rejects_singletons():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(23, 4))
    y = np.array(["a"] * 20 + ["b"] * 3)
    assert dataset_probe(x, y, pca_dim=2, seed=0)["n_splits"] == 3
    y1 = np.array(["a"] * 22 + ["b"])
    with pytest.raises(ValueError, match="at least 2 samples.*b \\(1\\)"):
        dataset_probe(x, y1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dataset_probe(x, np.array(["a"] * 23))


def test_probe_groups_prevent_image_leakage():
    """Tokens of one image share an image-specific offset. With token-level folds the probe
    recognises images seen in training and looks far above chance although both 'datasets'
    come from one distribution; grouped folds bring it back to chance.

    60 images in 96 dimensions: enough dimensions for a linear model to memorise images,
    enough images that the grouped estimate's SD (about 0.06 over seeds, image-level
    binomial noise) makes 0.2 a 3-SD band around chance."""
    rng = np.random.default_rng(15)
    n_img, per, d = 60, 5, 96
    offsets = rng.normal(scale=3.0, size=(n_img, d))
    x = np.repeat(offsets, per, axis=0) + rng.normal(size=(n_img * per, d))
    groups = np.repeat(np.arange(n_img), per)
    # tokens in scattered order: contiguous folds alone would keep an image's consecutive tokens together
    order = rng.permutation(len(x))
    x, groups = x[order], groups[order]
    y = np.where(groups % 2 == 0, "a", "b")
    leaky = dataset_probe(x, y, pca_dim=64, seed=0)
    grouped = dataset_probe(x, y, pca_dim=64, seed=0, groups=groups)
    assert leaky["balanced_accuracy_mean"] > 0.9
    assert abs(grouped["balanced_accuracy_mean"] - 0.5) < 0.2
    assert grouped["n_groups_per_class"] == {"a": 30, "b": 30}


def test_probe_permutation_p_value():
    rng = np.random.default_rng(16)
    x = np.concatenate([rng.normal(size=(30, 6)), rng.normal(size=(30, 6)) + 2])
    y = np.repeat(["a", "b"], 30)
    res = dataset_probe(x, y, pca_dim=4, n_splits=3, seed=0, n_permutations=19)
    assert res["p_value"] == pytest.approx(1 / 20)


# --------------------------------------------------------------------------- OOD


def test_ood_flags_nominal_fraction_in_distribution_and_all_of_a_shift():
    """Fresh in-distribution queries are flagged at ~3 %; a shifted set at ~100 %.

    Tolerance for the 3 %: binomial SD of 4000 queries (0.0027) and of the threshold's
    coverage from 2000 reference scores (0.0038) combine to 0.0047; 0.02 is over 4 SD.
    """
    rng = np.random.default_rng(17)
    d = 5
    ref = rng.normal(size=(2000, d))
    fresh = rng.normal(size=(4000, d))
    res = mahalanobis_ood(ref, fresh, percentile=97.0, seed=0)
    assert abs(res["fraction_flagged"] - 0.03) < 0.02
    assert abs(res["reference_fraction_flagged"] - 0.03) < 1.0 / len(ref) + 1e-12
    assert res["out_of_fold"] and res["n_reference"] == 2000 and res["n_query"] == 4000
    assert res["reference_scores"].shape == (2000,) and res["query_scores"].shape == (4000,)
    # A shift of 5 SD per axis is a Mahalanobis distance of about 11 against a threshold of
    # about sqrt(chi2_5(0.97)) = 3.5: essentially every sample is flagged.
    shifted = mahalanobis_ood(ref, fresh[:500] + 5.0, seed=0)
    assert shifted["fraction_flagged"] > 0.99


def test_ood_out_of_fold_threshold_is_closer_to_nominal_than_leave_in():
    """With n close to d, in-sample distances are optimistic and a leave-in threshold flags
    far more fresh in-distribution samples than the nominal 3 %; out-of-fold is closer."""
    err_oof, err_in = [], []
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        ref, fresh = rng.normal(size=(40, 20)), rng.normal(size=(2000, 20))
        err_oof.append(abs(mahalanobis_ood(ref, fresh, seed=0)["fraction_flagged"] - 0.03))
        err_in.append(abs(mahalanobis_ood(ref, fresh, n_splits=0)["fraction_flagged"] - 0.03))
    assert np.mean(err_oof) < np.mean(err_in)


def test_ood_handles_fewer_references_than_dimensions():
    rng = np.random.default_rng(18)
    ref = rng.normal(size=(20, 128))
    res = mahalanobis_ood(ref, rng.normal(size=(50, 128)) + 1.0, seed=0)
    assert np.isfinite(res["threshold"]) and 0 <= res["fraction_flagged"] <= 1
    assert 0 < res["shrinkage"] <= 1


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("balance", [False, True])
def test_pca_2d(balance):
    rng = np.random.default_rng(19)
    x = np.concatenate([rng.normal(size=(80, 12)), rng.normal(size=(10, 12)) + 2.0])
    labels = np.array(["a"] * 80 + ["b"] * 10)
    coords, evr = pca_2d(x, labels, balance=balance)
    assert coords.shape == (90, 2) and evr.shape == (2,)
    assert np.all(evr >= 0) and evr.sum() <= 1.0 + 1e-12 and evr[0] >= evr[1]
    if not balance:
        from sklearn.decomposition import PCA

        ref = PCA(n_components=2).fit(x)
        np.testing.assert_allclose(evr, ref.explained_variance_ratio_, rtol=1e-8)
        np.testing.assert_allclose(np.abs(coords), np.abs(ref.transform(x)), atol=1e-8)


def test_balanced_pca_gives_the_minority_its_axis():
    """A small dataset offset along a low-variance direction: the plain PCA's first axis
    follows the majority's large spread, the balanced one follows the dataset offset."""
    rng = np.random.default_rng(20)
    big = rng.normal(size=(300, 3)) * np.array([3.0, 0.1, 0.1])
    small = rng.normal(size=(10, 3)) * np.array([3.0, 0.1, 0.1]) + np.array([0.0, 4.0, 0.0])
    x, labels = np.concatenate([big, small]), np.array(["big"] * 300 + ["small"] * 10)
    plain, _ = pca_2d(x, labels)
    balanced, _ = pca_2d(x, labels, balance=True)

    def sep(c):  # separation of the dataset means along pc1, in units of the pooled SD
        return abs(c[:300, 0].mean() - c[300:, 0].mean()) / c[:, 0].std()

    assert sep(balanced) > sep(plain)


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
def test_umap_absent_returns_none():
    assert umap_2d(np.zeros((10, 3)), seed=0) is None


# --------------------------------------------------------------------------- domain


def test_sample_patch_tokens():
    rng = np.random.default_rng(21)
    grid = rng.normal(size=(3, 5, 4, 6))
    tokens, tile = sample_patch_tokens(grid, per_tile=7, seed=0, return_index=True)
    assert tokens.shape == (21, 5) and tile.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    for t in range(3):
        flat = grid[t].reshape(5, -1).T  # (h*w, C): every token of tile t
        rows = tokens[tile == t]
        hits = [np.flatnonzero(np.all(np.isclose(flat, r), axis=1)) for r in rows]
        assert all(len(h) == 1 for h in hits)  # each row is a real token of its own tile
        assert len({int(h[0]) for h in hits}) == 7  # drawn without replacement
    assert np.array_equal(sample_patch_tokens(grid, 7, seed=0), tokens)
    with pytest.raises(ValueError):
        sample_patch_tokens(grid, per_tile=25, seed=0)


def test_analyse_domains_tables_carry_counts():
    from em_foundation.analysis import frechet as frechet_module

    rng = np.random.default_rng(22)
    emb = {
        "lucchi": rng.normal(size=(60, 24)),
        "vnc": rng.normal(size=(12, 24)) + 0.8,
        "other": rng.normal(size=(15, 24)),
    }
    out = analyse_domains(emb, seed=0, n_boot=10, n_perm=10, pca_dim=6, umap=True)
    fr, pr, ood, pca, counts = out["frechet"], out["probe"], out["ood"], out["pca"], out["counts"]
    assert counts.set_index("dataset")["n"].to_dict() == {"lucchi": 60, "vnc": 12, "other": 15}
    assert len(fr) == 3 * 3 and set(fr["variant"]) == {"full", "ledoit_wolf", "pca6"}
    assert {"value", "ci_low", "ci_high", "n_a", "n_b", "dim", "p_value"} <= set(fr.columns)
    assert fr[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (fr.excess == fr.value - fr.null_mean).all() and ((fr.ci_low <= fr.excess) & (fr.excess <= fr.ci_high)).all()
    assert set(fr["ci_method"]) == {frechet_module.EXCESS_METHOD} and "value_debiased" not in fr
    row = fr[(fr.dataset_a == "lucchi") & (fr.dataset_b == "vnc") & (fr.variant == "pca6")].iloc[0]
    assert (row.n_a, row.n_b, row.dim, row.feature_dim) == (60, 12, 6, 24)
    assert len(pr) == 3 + 1 and "all" in set(pr["task"])
    assert pr.loc[pr.task == "lucchi vs vnc", "n_per_class"].item() == "lucchi=60;vnc=12"
    assert len(ood) == 3 * 2
    r = ood[(ood.reference == "vnc") & (ood["query"] == "lucchi")].iloc[0]
    assert (r.n_reference, r.n_query) == (12, 60)
    assert len(pca) == 87 and pca["explained_variance_pc1"].iloc[0] <= 1
    assert pca.groupby("dataset")["n_dataset"].first().to_dict() == {"lucchi": 60, "other": 15, "vnc": 12}
    if importlib.util.find_spec("umap") is None:
        assert any("umap" in n for n in out["notes"])


def test_analyse_domains_on_tokens_with_groups():
    rng = np.random.default_rng(23)
    ga, gb = rng.normal(size=(6, 8, 4, 4)), rng.normal(size=(5, 8, 4, 4)) + 1.0
    ta, ia = sample_patch_tokens(ga, per_tile=4, seed=0, return_index=True)
    tb, ib = sample_patch_tokens(gb, per_tile=4, seed=1, return_index=True)
    out = analyse_domains({"a": ta, "b": tb}, groups={"a": ia, "b": ib}, seed=0, n_boot=5, n_perm=5, pca_dim=4)
    assert out["counts"].set_index("dataset")["n_groups"].to_dict() == {"a": 6, "b": 5}
    fr = out["frechet"].iloc[0]
    assert (fr.n_a, fr.n_b, fr.n_groups_a, fr.n_groups_b) == (24, 20, 6, 5)
    assert out["probe"].iloc[0]["n_groups_per_class"] == "a=6;b=5"
    assert out["probe"].iloc[0]["n_splits"] == 5
    assert set(out["ood"]["n_groups_reference"]) == {6, 5}


def test_analyse_domains_needs_two_datasets_with_one_dim():
    rng = np.random.default_rng(24)
    with pytest.raises(ValueError, match="at least 2 datasets"):
        analyse_domains({"a": rng.normal(size=(5, 3))})
    with pytest.raises(ValueError, match="shared d"):
        analyse_domains({"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(5, 4))})


def _gaussian_pairs(d, n_x, n_y, shift, scale, repeats=20):
    mean_y = np.zeros(d)
    mean_y[0] = shift
    for r in range(repeats):
        rng = np.random.default_rng(r)
        yield r, rng.normal(size=(n_x, d)), mean_y + scale * rng.normal(size=(n_y, d))


def test_frechet_excess_interval_covers_zero_between_equal_distributions():
    """Two samples of one Gaussian, few vectors in many dimensions (d = 16, n = 60 vs 15, as
    20 VNC images against Lucchi++): the reported excess over the permutation null covers 0 in
    >= 90 % of 20 repeats; the bootstrap bias-corrected interval shown before does not."""
    from em_foundation.analysis.frechet import frechet_excess

    excess, old = 0, 0
    for r, x, y in _gaussian_pairs(16, 60, 15, 0.0, 1.0):
        res = frechet_excess(x, y, n_boot=100, n_perm=100, seed=r, method="eigh")
        excess += res["ci_low"] <= 0.0 <= res["ci_high"]
        basic = frechet_bootstrap(x, y, n_boot=100, seed=r, method="eigh")
        old += basic["ci_low"] <= 0.0 <= basic["ci_high"]
    assert excess / 20 >= 0.9
    assert old / 20 < 0.9


def test_frechet_excess_interval_covers_a_known_distance():
    from em_foundation.analysis.frechet import frechet_excess

    d, shift, scale = 8, 1.0, 1.2
    truth = frechet_gaussian(np.zeros(d), np.eye(d), np.eye(d)[0] * shift, np.eye(d) * scale**2)
    assert truth == pytest.approx(shift**2 + d * (scale - 1) ** 2)
    covered = 0
    for r, x, y in _gaussian_pairs(d, 200, 100, shift, scale):
        res = frechet_excess(x, y, n_boot=100, n_perm=100, seed=r, method="eigh")
        covered += res["ci_low"] <= truth <= res["ci_high"]
        assert res["excess"] == pytest.approx(res["value"] - res["null_mean"])
    assert covered / 20 >= 0.9


def _near_copy_series(rng, objects, copies, d):
    """A serial-section-like series: each 'object' seen in ``copies`` consecutive near-identical sections."""
    base = rng.normal(size=(objects, d))
    return np.repeat(base, copies, axis=0) + 0.01 * rng.normal(size=(objects * copies, d))


def test_probe_folds_are_contiguous_so_near_copy_neighbours_do_not_inflate_it():
    """Two datasets drawn from one distribution, as series of near-copy neighbours: shuffled
    folds let the probe recognise each test section's neighbours (accuracy near 1); the
    contiguous folds the probe uses leave it at chance."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    from em_foundation.analysis.probe import make_probe

    rng = np.random.default_rng(0)
    x = np.concatenate([_near_copy_series(rng, 15, 4, 40), _near_copy_series(rng, 15, 4, 40)])
    y = np.array(["a"] * 60 + ["b"] * 60)
    plain = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        model = make_probe(40, seed=0).fit(x[train], y[train])
        plain.append(balanced_accuracy_score(y[test], model.predict(x[test])))
    assert np.mean(plain) > 0.9
    grouped = dataset_probe(x, y, pca_dim=64, seed=0)
    assert grouped["balanced_accuracy_mean"] < 0.7


def test_ood_threshold_from_contiguous_folds_flags_new_sections_at_the_nominal_rate():
    from sklearn.model_selection import KFold

    from em_foundation.analysis.ood import fit_ledoit_wolf, mahalanobis_ood, mahalanobis_scores

    rng = np.random.default_rng(1)
    reference, query = _near_copy_series(rng, 20, 5, 40), _near_copy_series(rng, 20, 5, 40)
    result = mahalanobis_ood(reference, query, percentile=97.0)
    assert result["fraction_flagged"] <= 0.15  # same distribution: about the nominal 3 %, up to n = 100 noise
    shuffled = np.empty(len(reference))
    for train, test in KFold(5, shuffle=True, random_state=0).split(reference):
        shuffled[test] = mahalanobis_scores(fit_ledoit_wolf(reference[train]), reference[test])
    threshold = np.percentile(shuffled, 97.0)
    assert np.mean(mahalanobis_scores(fit_ledoit_wolf(reference), query) > threshold) > 0.5
