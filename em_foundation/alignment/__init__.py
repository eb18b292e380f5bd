"""Domain alignment for multi-dataset training (see "Beyond the study" in docs/published-setup.md).

* ``features``: per-domain standardisation of cached patch tokens.
* ``intensity``: per-domain intensity normalisation of raw uint8 slices.
* ``adabn``: re-estimating batch-norm statistics on a target domain (AdaBN).

Every statistic a method takes from a *test* dataset uses its images only, never its
labels; that is still transductive and is recorded as such wherever it is used.
"""

from em_foundation.alignment.adabn import adapt_batchnorm, batchnorm_layers, iterate_batches, segmenter_forward
from em_foundation.alignment.features import (
    DomainStats,
    FeatureStandardiser,
    RunningMoments,
    domain_stats,
    domain_stats_from_cache,
    standardise,
    standardise_by_source,
    stats_by_source,
)
from em_foundation.alignment.intensity import (
    histogram_match,
    histogram_matching_table,
    intensity_bounds,
    intensity_histogram,
    percentile_normalise,
    reference_quantiles,
)

__all__ = [
    "DomainStats",
    "FeatureStandardiser",
    "RunningMoments",
    "adapt_batchnorm",
    "batchnorm_layers",
    "domain_stats",
    "domain_stats_from_cache",
    "histogram_match",
    "histogram_matching_table",
    "intensity_bounds",
    "intensity_histogram",
    "iterate_batches",
    "percentile_normalise",
    "reference_quantiles",
    "segmenter_forward",
    "standardise",
    "standardise_by_source",
    "stats_by_source",
]
