"""Domain alignment (docs/published-setup.md, "Beyond the study"): per-domain feature standardisation, intensity normalisation
and AdaBN. Small synthetic arrays only; the whole file runs in a few seconds on CPU."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from em_foundation.alignment import (
    DomainStats,
    FeatureStandardiser,
    adapt_batchnorm,
    batchnorm_layers,
    domain_stats,
    domain_stats_from_cache,
    histogram_match,
    histogram_matching_table,
    intensity_bounds,
    percentile_normalise,
    reference_quantiles,
    segmenter_forward,
    standardise,
    standardise_by_source,
    stats_by_source,
)
from em_foundation.heads.deconv import DeconvHead
from em_foundation.training.segmenter import CachedFeatureSegmenter

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- features


def gaussian_tokens(rng, n, channels=6, grid=5, loc=0.0, scale=1.0):
    """float16 tokens whose channels each have their own offset and spread."""
    offsets = rng.normal(loc, 2.0, size=(1, channels, 1, 1))
    spreads = scale * rng.uniform(0.5, 2.0, size=(1, channels, 1, 1))
    return (offsets + spreads * rng.standard_normal((n, channels, grid, grid))).astype(np.float16)


@pytest.fixture(scope="module")
def union():
    rng = np.random.default_rng(0)
    a = gaussian_tokens(rng, 9, loc=3.0, scale=0.5)
    b = gaussian_tokens(rng, 4, loc=-20.0, scale=8.0)
    tokens = np.concatenate([a, b])
    sources = np.array(["lucchi"] * len(a) + ["vnc"] * len(b))
    order = rng.permutation(len(tokens))  # sources interleaved, as in a shuffled union
    return tokens[order], sources[order]


def test_streaming_stats_equal_numpy_over_all_tokens(union):
    tokens, _ = union
    stats = domain_stats(tokens, dataset="u", chunk_tiles=3)  # 13 tiles: uneven last chunk
    reference = tokens.astype(np.float64)
    np.testing.assert_allclose(stats.mean, reference.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std, reference.std(axis=(0, 2, 3)), rtol=1e-12)
    assert stats.n_tokens == tokens.shape[0] * tokens.shape[2] * tokens.shape[3]
    assert stats.dataset == "u" and stats.channels == tokens.shape[1]
    # the chunk size changes nothing but rounding
    np.testing.assert_allclose(domain_stats(tokens, chunk_tiles=100).mean, stats.mean, rtol=1e-12, atol=1e-12)


def test_stats_stable_for_large_offsets():
    # sums of squares would lose the variance here; the pairwise merge does not
    rng = np.random.default_rng(1)
    tokens = (1e6 + rng.standard_normal((7, 3, 4, 4))).astype(np.float32)
    stats = domain_stats(tokens, chunk_tiles=2)
    np.testing.assert_allclose(stats.std, tokens.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-9)


def test_standardised_union_has_zero_mean_unit_variance_per_source_and_channel(union):
    tokens, sources = union
    stats = stats_by_source(tokens, sources, eps=1e-12)
    assert set(stats) == {"lucchi", "vnc"}
    out = standardise_by_source(tokens, sources, stats, chunk_tiles=2)
    assert out.dtype == np.float32 and out.shape == tokens.shape
    for source in ("lucchi", "vnc"):
        part = out[sources == source].astype(np.float64)
        np.testing.assert_allclose(part.mean(axis=(0, 2, 3)), 0.0, atol=1e-6)
        np.testing.assert_allclose(part.var(axis=(0, 2, 3)), 1.0, atol=1e-6)
        # and each tile went through its own source's statistics, not the other's
        np.testing.assert_allclose(part, standardise(tokens[sources == source], stats[source]), rtol=0, atol=0)
    # pooled standardisation of the union would not do that: the domains stay apart
    pooled = standardise(tokens, domain_stats(tokens, eps=1e-12)).astype(np.float64)
    assert np.abs(pooled[sources == "vnc"].mean(axis=(0, 2, 3))).max() > 0.5


def test_standardise_by_source_refuses_unknown_source(union):
    tokens, sources = union
    stats = stats_by_source(tokens, sources)
    del stats["vnc"]
    with pytest.raises(KeyError, match="vnc"):
        standardise_by_source(tokens, sources, stats)


def test_constant_channel_maps_to_zero_not_nan():
    tokens = np.ones((2, 2, 3, 3), dtype=np.float16)
    tokens[:, 1] = np.arange(9, dtype=np.float16).reshape(3, 3)
    out = standardise(tokens, domain_stats(tokens))
    assert np.isfinite(out).all() and np.all(out[:, 0] == 0)


def test_stats_from_cache_json_round_trip_and_torch_module(tmp_path, union):
    tokens, _ = union
    path = tmp_path / "cache.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("test").create_dataset("tokens", data=tokens, chunks=(1, *tokens.shape[1:]))
    stats = domain_stats_from_cache(path, "test", dataset="vnc", chunk_tiles=4)
    np.testing.assert_allclose(stats.mean, domain_stats(tokens).mean, rtol=1e-12, atol=1e-12)
    assert stats.split == "test"
    restored = DomainStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(restored.mean, stats.mean)
    np.testing.assert_array_equal(restored.std, stats.std)
    assert (restored.dataset, restored.n_tokens, restored.eps) == ("vnc", stats.n_tokens, stats.eps)

    module = FeatureStandardiser.from_stats(stats)
    assert {"mean", "std"} <= set(module.state_dict())
    got = module(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, standardise(tokens, stats), rtol=1e-5, atol=1e-5)
    other = domain_stats(tokens[:3])
    module.load_stats(other)
    np.testing.assert_allclose(
        module(torch.from_numpy(tokens)).numpy(), standardise(tokens, other), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------- intensity


def em_like(rng, n=4, size=48, loc=120.0, spread=30.0):
    return np.clip(rng.normal(loc, spread, size=(n, size, size)), 0, 255).astype(np.uint8)


def test_intensity_bounds_equal_numpy_percentiles():
    rng = np.random.default_rng(2)
    images = em_like(rng)
    for low, high in ((1.0, 99.0), (0.0, 100.0), (0.5, 37.3), (12.25, 87.5)):
        np.testing.assert_allclose(intensity_bounds(images, low, high), np.percentile(images, [low, high]), atol=1e-9)


def test_percentile_normalise_maps_percentiles_to_range_ends():
    rng = np.random.default_rng(3)
    images = em_like(rng, loc=90.0, spread=12.0)  # a dim, low-contrast domain
    out = percentile_normalise(images)
    assert out.dtype == np.uint8 and out.shape == images.shape
    low, high = np.percentile(out, [1.0, 99.0])
    assert low <= 1.0 and high >= 254.0
    lo, hi = np.percentile(images, [1.0, 99.0])
    assert np.all(out[images <= lo] == 0) and np.all(out[images >= hi] == 255)
    # monotone: a brighter input pixel is never darker afterwards
    flat_in, flat_out = images.ravel(), out.ravel()
    order = np.argsort(flat_in, kind="stable")
    assert np.all(np.diff(flat_out[order].astype(int)) >= 0)
    # stored bounds reproduce the map (how a test split can reuse its train split's)
    np.testing.assert_array_equal(percentile_normalise(images, bounds=(lo, hi)), out)


def test_percentile_normalise_whole_split_keeps_differences_between_slices():
    rng = np.random.default_rng(4)
    dim, bright = em_like(rng, n=1, loc=80.0), em_like(rng, n=1, loc=150.0)
    images = np.concatenate([dim, bright])
    shared = percentile_normalise(images).astype(float)
    assert shared[1].mean() - shared[0].mean() > 60  # one map for the split: the bright slice stays brighter
    each = percentile_normalise(images, per_image=True).astype(float)
    assert abs(each[1].mean() - each[0].mean()) < 10  # per image: the difference is stretched away
    for image, normalised in zip(images, each):
        low, high = np.percentile(normalised, [1.0, 99.0])
        assert low <= 1.0 and high >= 254.0


def skimage_style_match(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """skimage.exposure.match_histograms' _match_cumulative_cdf, on the pooled arrays."""
    src_values, src_lookup, src_counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    tmpl_values, tmpl_counts = np.unique(template.ravel(), return_counts=True)
    src_quantiles = np.cumsum(src_counts) / source.size
    tmpl_quantiles = np.cumsum(tmpl_counts) / template.size
    return np.interp(src_quantiles, tmpl_quantiles, tmpl_values)[src_lookup.ravel()].reshape(source.shape)


@pytest.fixture(scope="module")
def two_domains():
    rng = np.random.default_rng(0)
    reference = em_like(rng, n=3, size=128, loc=130.0, spread=35.0)
    other = (255 * rng.beta(2, 5, size=(4, 100, 100))).astype(np.uint8)  # skewed and darker
    return reference, other


def max_cdf_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov distance between two uint8 arrays' grey-level distributions."""
    cdf = lambda x: np.cumsum(np.bincount(x.ravel(), minlength=256)) / x.size  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_histogram_match_agrees_with_reference_quantiles_and_keeps_ranks(two_domains):
    reference, other = two_domains
    matched = histogram_match(other, reference)
    assert matched.dtype == np.uint8 and matched.shape == other.shape
    levels = np.linspace(1, 99, 49)
    before = np.abs(np.percentile(other, levels) - np.percentile(reference, levels))
    after = np.abs(np.percentile(matched, levels) - np.percentile(reference, levels))
    assert before.max() > 40
    assert after.max() <= 2.0
    # what a grey-level map can reach: the distributions differ by at most the largest
    # single source grey level's share of pixels (a level cannot be split between outputs)
    largest_atom = np.bincount(other.ravel()).max() / other.size
    assert max_cdf_gap(matched, reference) <= largest_atom + 1e-3 < max_cdf_gap(other, reference)
    table = histogram_matching_table(other, reference)
    assert np.all(np.diff(table.astype(int)) >= 0)
    order = np.argsort(other.ravel(), kind="stable")
    assert np.all(np.diff(matched.ravel()[order].astype(int)) >= 0)
    # the same map as skimage's CDF matching on the pooled pixels, rounded to grey levels
    np.testing.assert_array_equal(matched, np.rint(skimage_style_match(other, reference)).astype(np.uint8))


def test_histogram_match_from_stored_quantiles(two_domains):
    reference, other = two_domains
    stored = json.loads(json.dumps(reference_quantiles(reference, 256).tolist()))
    assert len(stored) == 256 and stored[0] == reference.min() and stored[-1] == reference.max()
    from_table = histogram_match(other, quantiles=np.array(stored))
    from_images = histogram_match(other, reference)
    difference = np.abs(from_table.astype(int) - from_images.astype(int))
    assert np.mean(difference <= 1) >= 0.99
    levels = np.linspace(1, 99, 49)
    assert np.abs(np.percentile(from_table, levels) - np.percentile(reference, levels)).max() <= 2.0
    with pytest.raises(ValueError, match="exactly one"):
        histogram_match(other, reference, quantiles=np.array(stored))


def test_intensity_functions_want_uint8():
    with pytest.raises(TypeError, match="uint8"):
        percentile_normalise(np.zeros((1, 4, 4), dtype=np.float32))


# --------------------------------------------------------------------------- AdaBN


def head_forward(model, batch):
    return model(batch, tuple(batch.shape[-2:]))


@pytest.fixture(scope="module")
def source_head():
    torch.manual_seed(0)
    head = DeconvHead(in_channels=6, width=16, up_blocks=2)
    for layer in head.modules():  # affine parameters away from 1/0, so "untouched" means something
        if isinstance(layer, nn.BatchNorm2d):
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
    head.train()
    with torch.no_grad():  # source-domain running statistics
        for _ in range(3):
            head(torch.randn(2, 6, 4, 4), (4, 4))
    return head.eval()


def target_batch(seed, n=3):
    generator = torch.Generator().manual_seed(seed)
    return 4.0 + 3.0 * torch.randn(n, 6, 4, 4, generator=generator)


def bn_inputs_in_train_mode(model, batch):
    """Every BN layer's input in a train-mode pass, captured by forward hooks (independent of AdaBN)."""
    probe = copy.deepcopy(model)
    for layer in probe.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.train()
    captured, handles = {}, []

    def capture(name):
        def hook(module, args, output):  # returns None: a forward hook's return value would replace the output
            captured[name] = args[0].clone()

        return hook

    for name, layer in batchnorm_layers(probe):
        handles.append(layer.register_forward_hook(capture(name)))
    with torch.no_grad():
        head_forward(probe, batch)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("pooled", [True, False])
def test_adabn_changes_only_batchnorm_running_statistics(source_head, pooled):
    before = copy.deepcopy(source_head.state_dict())
    momenta = [m.momentum for m in source_head.modules() if isinstance(m, nn.BatchNorm2d)]
    batch = target_batch(1)
    adapted = adapt_batchnorm(source_head, [batch], head_forward, pooled=pooled)

    after = adapted.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith(RUNNING) for k in changed)
    assert all(k in changed for k in after if k.endswith(("running_mean", "running_var")))

    # the first BN layer (stem.1) sees conv(x): its statistics by hand
    conv_out = source_head.stem[0](batch).detach()
    np.testing.assert_allclose(adapted.stem[1].running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        adapted.stem[1].running_var, conv_out.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-5
    )
    # every BN layer: statistics of its input in a train-mode pass, captured by hooks
    for name, x in bn_inputs_in_train_mode(source_head, batch).items():
        layer = adapted.get_submodule(name)
        np.testing.assert_allclose(layer.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.running_var, x.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert int(layer.num_batches_tracked) == 1

    # the copy is ready for inference; the source model is exactly as it was
    assert not any(m.training for m in adapted.modules())
    assert [m.momentum for m in adapted.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert all(torch.equal(v, before[k]) for k, v in source_head.state_dict().items())
    assert not source_head.training
    assert [m.momentum for m in source_head.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


def test_adabn_over_several_batches_pooled_and_cumulative(source_head):
    batches = [target_batch(2, n=1), target_batch(3, n=4), target_batch(4, n=2)]
    conv = [source_head.stem[0](b).detach().double() for b in batches]
    pooled = adapt_batchnorm(source_head, batches, head_forward).stem[1]
    everything = torch.cat(conv)
    np.testing.assert_allclose(pooled.running_mean, everything.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled.running_var, everything.var(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert int(pooled.num_batches_tracked) == 3
    # momentum=None alone: PyTorch's average of per-batch means and unbiased variances
    cumulative = adapt_batchnorm(source_head, batches, head_forward, pooled=False).stem[1]
    np.testing.assert_allclose(
        cumulative.running_mean, torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        cumulative.running_var, torch.stack([c.var(dim=(0, 2, 3)) for c in conv]).mean(0), rtol=1e-5, atol=1e-5
    )


def test_adabn_on_cached_feature_segmenter_with_layer_selection():
    torch.manual_seed(1)
    model = CachedFeatureSegmenter(in_channels=6, width=16, patch_size=8).eval()
    before = copy.deepcopy(model.state_dict())
    tokens = target_batch(5).half()  # float16, as cached
    adapted = adapt_batchnorm(model, [tokens], segmenter_forward, select=lambda name: name.startswith("head.stem"))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.stem.1.running_mean", "head.stem.1.running_var", "head.stem.1.num_batches_tracked"}


def test_adabn_refuses_no_batches_and_no_batchnorm(source_head):
    with pytest.raises(ValueError, match="no target batches"):
        adapt_batchnorm(source_head, [], head_forward)
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(2, 2, 1)), [torch.zeros(1, 2, 2, 2)])
