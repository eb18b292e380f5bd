# Backbones: weights fetched once on the login node; a parameter table from random weights.


rule fetch_weights:
    output:
        f"{config['hub']['cache_dir']}/{{backbone}}.json",
    log:
        logs("fetch_weights/{backbone}.log"),
    benchmark:
        benchmarks("fetch_weights/{backbone}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        backbone=lambda w: config["backbones"][w.backbone],
        hub=config["hub"],
    script:
        "../scripts/fetch_weights.py"


# Total and trainable parameters per backbone x regime; part of `all`, or on its own with
# `snakemake parameters` (built on PyTorch's meta device: nothing is downloaded).
rule parameters:
    output:
        results("tables/parameters.csv"),
    log:
        logs("parameters/parameters.log"),
    benchmark:
        benchmarks("parameters/parameters.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        backbones=config["backbones"],
        regimes=config["regimes"],
        head=config["head"],
        lora=config["lora"],
        code=code_digest("parameters.py"),
    script:
        "../scripts/parameters.py"
