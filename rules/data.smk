# Data: download (login node), convert to the prepared HDF5, draw validation splits, tile.


rule download_dataset:
    output:
        "resources/downloads/{dataset}.zip",
    log:
        logs("download_dataset/{dataset}.log"),
    benchmark:
        benchmarks("download_dataset/{dataset}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        url=lambda w: config["datasets"][w.dataset]["url"],
        sha256=lambda w: config["datasets"][w.dataset]["sha256"],
    script:
        "../scripts/download_dataset.py"


rule prepare_dataset:
    input:
        dataset_archive,
    output:
        h5=prepared_path("{dataset}"),
        report=results("prepared/{dataset}.integrity.json"),
    log:
        logs("prepare_dataset/{dataset}.log"),
    benchmark:
        benchmarks("prepare_dataset/{dataset}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        dataset=lambda w: config["datasets"][w.dataset],
        code=code_digest("prepare_dataset.py"),
    script:
        "../scripts/prepare_dataset.py"


rule split_validation:
    input:
        prepared_path("{dataset}"),
    output:
        results("splits/{dataset}/seed{seed}.json"),
    log:
        logs("split_validation/{dataset}_seed{seed}.log"),
    benchmark:
        benchmarks("split_validation/{dataset}_seed{seed}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        val_fraction=config["training"]["val_fraction"],
        val_split=config["training"]["val_split"],
        val_gap=config["training"]["val_gap"],
        # training.val_split auto follows the dataset's test split
        test_split=lambda w: {k: config["datasets"][w.dataset].get("options", {}).get(k) for k in ("split", "gap")},
        code=code_digest("split_validation.py"),
    script:
        "../scripts/split_validation.py"


# The view (tile geometry, e.g. tile448o64 or resize1022p14) is in the path, so a tiling
# change makes new tiles beside the old ones instead of overwriting them.
rule tile_dataset:
    input:
        unpack(tile_sources),
    output:
        results("tiles/{view}/{dataset}.h5"),
    log:
        logs("tile_dataset/{view}_{dataset}.log"),
    benchmark:
        benchmarks("tile_dataset/{view}_{dataset}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        percentiles=lambda w: config["alignment"]["percentiles"] if "-percentile" in w.view else [],
        code=code_digest("tile_dataset.py"),
    script:
        "../scripts/tile_dataset.py"
