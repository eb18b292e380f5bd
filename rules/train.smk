# Training: one job per (backbone, regime, training set, alignment, seed), one rule per
# regime of em_foundation/regimes.py. Cached regimes (head, forest) read only the feature
# cache; the others (LoRA, full fine-tuning, a whole supervised U-Net) read tiles and weights;
# the per-pixel forest reads tiles, and the cache where its backbone's tokens are not the filter bank.


rule train_head:
    input:
        unpack(split_inputs),
        unpack(tile_inputs),
        unpack(feature_inputs),
    output:
        **run_outputs("head"),
    log:
        logs(f"train_head/{run_flat('head')}.log"),
    benchmark:
        benchmarks(f"train_head/{run_flat('head')}.tsv")
    conda:
        "../envs/workflow.yaml"
    threads: config["compute"]["threads"]
    params:
        **train_params("head"),
    script:
        "../scripts/train.py"


use rule train_head as train_forest with:
    output:
        **run_outputs("forest"),
    log:
        logs(f"train_forest/{run_flat('forest')}.log"),
    benchmark:
        benchmarks(f"train_forest/{run_flat('forest')}.tsv")
    params:
        **train_params("forest"),


use rule train_head as train_pixelforest with:
    input:
        unpack(split_inputs),
        unpack(tile_inputs),
        unpack(token_inputs("pixelforest")),
    output:
        **run_outputs("pixelforest"),
    log:
        logs(f"train_pixelforest/{run_flat('pixelforest')}.log"),
    benchmark:
        benchmarks(f"train_pixelforest/{run_flat('pixelforest')}.tsv")
    params:
        **train_params("pixelforest"),


use rule train_head as train_lora with:
    input:
        unpack(split_inputs),
        unpack(tile_inputs),
        weights=weights_input,
    output:
        **run_outputs("lora"),
    log:
        logs(f"train_lora/{run_flat('lora')}.log"),
    benchmark:
        benchmarks(f"train_lora/{run_flat('lora')}.tsv")
    params:
        **train_params("lora"),


use rule train_lora as train_fullft with:
    output:
        **run_outputs("fullft"),
    log:
        logs(f"train_fullft/{run_flat('fullft')}.log"),
    benchmark:
        benchmarks(f"train_fullft/{run_flat('fullft')}.tsv")
    params:
        **train_params("fullft"),


use rule train_lora as train_supervised with:
    output:
        **run_outputs("supervised"),
    log:
        logs(f"train_supervised/{run_flat('supervised')}.log"),
    benchmark:
        benchmarks(f"train_supervised/{run_flat('supervised')}.tsv")
    params:
        **train_params("supervised"),
