# Backbones: weights fetched once on the login node; a parameter table from random weights.


rule fetch_weights:
    output:
        f"{config['hub']['cache_dir']}/{{backbone}}.json",
    params:
        backbone=lambda w: config["backbones"][w.backbone],
        hub=config["hub"],
    log:
        "results/logs/fetch_weights/{backbone}.log",
    benchmark:
        "results/benchmarks/fetch_weights/{backbone}.tsv"
    conda:
        "../envs/features.yaml"
    script:
        "../scripts/fetch_weights.py"


rule parameters:
    output:
        "results/tables/parameters.csv",
    params:
        backbones=config["backbones"],
        regimes=config["regimes"],
        head=config["head"],
        lora=config["lora"],
        code=code_digest("backbones", "heads", *CORE),
    log:
        "results/logs/parameters/parameters.log",
    benchmark:
        "results/benchmarks/parameters/parameters.tsv"
    conda:
        "../envs/features.yaml"
    script:
        "../scripts/parameters.py"
