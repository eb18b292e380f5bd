# Predictions on new images: one trained model (config `predict:`) applied to unlabelled
# images at native resolution. Not part of `all`; run it as the target `predict`.


rule predict:
    input:
        unpack(predict_inputs),
    output:
        directory(results(f"predictions/{PREDICT['name']}")),
    log:
        logs(f"predict/{PREDICT['name']}.log"),
    benchmark:
        benchmarks(f"predict/{PREDICT['name']}.tsv")
    conda:
        "../envs/workflow.yaml"
    threads: config["compute"]["threads"]
    params:
        **compute_params(),
        predict=config["predict"],
        run=PREDICT,
        backbone=config["backbones"][PREDICT["backbone"]],
        view=grid.view_of(config, PREDICT["backbone"], grid.input_variant(config, PREDICT["alignment"])),
        percentiles=config["alignment"]["percentiles"],
        batch_size=config["features"]["batch_size"],
        code=code_digest("predict.py"),
    script:
        "../scripts/predict.py"
