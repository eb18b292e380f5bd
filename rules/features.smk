# Feature cache: each backbone runs once over every tile; heads train on the cache.


rule cache_features:
    input:
        tiles=lambda w: tiles_path(w.backbone, w.dataset),
        weights=weights_input,
    output:
        features_path("{backbone}", "{dataset}"),
    log:
        logs("cache_features/{backbone}_{dataset}.log"),
    benchmark:
        benchmarks("cache_features/{backbone}_{dataset}.tsv")
    conda:
        "../envs/workflow.yaml"
    threads: config["compute"]["threads"]
    params:
        **compute_params(),
        backbone=lambda w: config["backbones"][w.backbone],
        features=config["features"],
        code=code_digest("cache_features.py"),
    script:
        "../scripts/cache_features.py"


# Features of intensity-normalised tiles (alignment variants percentile and histmatch).
use rule cache_features as cache_features_aligned with:
    input:
        tiles=lambda w: tiles_path(w.backbone, w.dataset, w.intensity),
        weights=weights_input,
    output:
        features_path("{backbone}", "{dataset}", "{intensity}"),
    log:
        logs("cache_features/{backbone}_{intensity}_{dataset}.log"),
    benchmark:
        benchmarks("cache_features/{backbone}_{intensity}_{dataset}.tsv")
