# Data: download (login node), convert to the prepared HDF5, draw validation splits, tile.


def dataset_archive(w):
    """Downloaded datasets depend on their archive; generated ones on nothing."""
    return [f"resources/downloads/{w.dataset}.zip"] if config["datasets"][w.dataset]["url"] else []


rule download_dataset:
    output:
        "resources/downloads/{dataset}.zip",
    params:
        url=lambda w: config["datasets"][w.dataset]["url"],
        sha256=lambda w: config["datasets"][w.dataset]["sha256"],
    log:
        "results/logs/download_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/download_dataset/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/download_dataset.py"


rule prepare_dataset:
    input:
        dataset_archive,
    output:
        h5="results/prepared/{dataset}.h5",
        report="results/prepared/{dataset}.integrity.json",
    params:
        dataset=lambda w: config["datasets"][w.dataset],
        code=code_digest("data", *CORE),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/prepare_dataset.py"


rule split_validation:
    input:
        "results/prepared/{dataset}.h5",
    output:
        "results/splits/{dataset}/seed{seed}.json",
    params:
        val_fraction=config["training"]["val_fraction"],
        code=code_digest("data/splits.py", *CORE),
    log:
        "results/logs/split_validation/{dataset}_seed{seed}.log",
    benchmark:
        "results/benchmarks/split_validation/{dataset}_seed{seed}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/split_validation.py"


rule tile_dataset:
    input:
        "results/prepared/{dataset}.h5",
    output:
        "results/tiles/{dataset}.h5",
    params:
        tiling=config["tiling"],
        code=code_digest("data/tiles.py", "data/tiling.py", "data/prepared.py", *CORE),
    log:
        "results/logs/tile_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/tile_dataset/{dataset}.tsv"
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/tile_dataset.py"
