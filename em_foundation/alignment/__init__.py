"""Domain alignment for multi-dataset training (see "Beyond the study" in docs/published-setup.md).

* ``features``: per-domain standardisation of cached patch tokens.
* ``intensity``: per-domain intensity normalisation of raw uint8 slices.
* ``adabn``: re-estimating batch-norm statistics on a target domain (AdaBN).

The workflow uses them inductively by default: a target dataset's statistics come from
its unlabelled *training* split, never from the test images being scored. Statistics of
the test images themselves (images only, never labels) are transductive and used only by
the alignment variants that say so (component ``trans``, see grid.parse_alignment);
runs.csv and summary.csv mark them in their ``transductive`` column.
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
