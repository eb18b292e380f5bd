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


# Features of aligned tiles (alignment variants percentile, histmatch and rescale).
use rule cache_features as cache_features_aligned with:
    input:
        tiles=lambda w: tiles_path(w.backbone, w.dataset, w.variant),
        weights=weights_input,
    output:
        features_path("{backbone}", "{dataset}", "{variant}"),
    log:
        logs("cache_features/{backbone}_{variant}_{dataset}.log"),
    benchmark:
        benchmarks("cache_features/{backbone}_{variant}_{dataset}.tsv")
