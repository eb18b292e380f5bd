# Feature cache: each backbone runs once over every tile; heads train on the cache.


rule cache_features:
    input:
        tiles=lambda w: tiles_path(w.backbone, w.dataset),
        weights=weights_input,
    output:
        "results/features/{backbone}/{dataset}.h5",
    params:
        backbone=lambda w: config["backbones"][w.backbone],
        features=config["features"],
        code=code_digest("backbones", "features.py", "data/tiles.py", *CORE),
    threads: config["compute"]["threads"]
    log:
        "results/logs/cache_features/{backbone}_{dataset}.log",
    benchmark:
        "results/benchmarks/cache_features/{backbone}_{dataset}.tsv"
    conda:
        "../envs/features.yaml"
    script:
        "../scripts/cache_features.py"


# Features of intensity-normalised tiles (alignment variants percentile and histmatch).
use rule cache_features as cache_features_aligned with:
    input:
        tiles=lambda w: tiles_path(w.backbone, w.dataset, w.intensity),
        weights=weights_input,
    output:
        "results/features/{backbone}/{intensity}/{dataset}.h5",
    log:
        "results/logs/cache_features/{backbone}_{intensity}_{dataset}.log",
    benchmark:
        "results/benchmarks/cache_features/{backbone}_{intensity}_{dataset}.tsv"
