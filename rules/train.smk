# Training: one job per (backbone, regime, training set, seed). Head training reads only
# the feature cache; LoRA and full fine-tuning read tiles and weights.

rule train_head:
    input:
        unpack(split_inputs),
        unpack(tile_inputs),
        unpack(feature_inputs),
    output:
        **run_outputs("head"),
    params:
        datasets=train_datasets,
        head=config["head"],
        training=config["training"],
        code=code_digest("training", "heads", "features.py", "data/tiles.py", "backbones/lora.py", *CORE),
    threads: config["compute"]["threads"]
    log:
        "results/logs/train_head/{backbone}_{train_set}_{alignment}_seed{seed}.log",
    benchmark:
        "results/benchmarks/train_head/{backbone}_{train_set}_{alignment}_seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train.py"


use rule train_head as train_lora with:
    input:
        unpack(split_inputs),
        unpack(tile_inputs),
        weights=weights_input,
    output:
        **run_outputs("lora"),
    params:
        datasets=train_datasets,
        backbone=lambda w: config["backbones"][w.backbone],
        head=config["head"],
        lora=config["lora"],
        training=config["training"],
        code=code_digest("training", "heads", "backbones", "features.py", "data/tiles.py", *CORE),
    log:
        "results/logs/train_lora/{backbone}_{train_set}_{alignment}_seed{seed}.log",
    benchmark:
        "results/benchmarks/train_lora/{backbone}_{train_set}_{alignment}_seed{seed}.tsv"


use rule train_lora as train_fullft with:
    output:
        **run_outputs("fullft"),
    params:
        datasets=train_datasets,
        backbone=lambda w: config["backbones"][w.backbone],
        head=config["head"],
        training=config["training"],
        code=code_digest("training", "heads", "backbones", "features.py", "data/tiles.py", *CORE),
    log:
        "results/logs/train_fullft/{backbone}_{train_set}_{alignment}_seed{seed}.log",
    benchmark:
        "results/benchmarks/train_fullft/{backbone}_{train_set}_{alignment}_seed{seed}.tsv"


use rule train_head as train_forest with:
    output:
        **run_outputs("forest"),
    params:
        datasets=train_datasets,
        forest=config["forest"],
        code=code_digest("training", "features.py", "data/tiles.py", *CORE),
    log:
        "results/logs/train_forest/{backbone}_{train_set}_{alignment}_seed{seed}.log",
    benchmark:
        "results/benchmarks/train_forest/{backbone}_{train_set}_{alignment}_seed{seed}.tsv"
