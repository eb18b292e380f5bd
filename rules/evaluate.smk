# Evaluation: every trained model on every test set, at native resolution. One job per
# model scores all test sets, so the model (and for LoRA the backbone) is built once.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=per_test_set(".json"),
        images=per_test_set(".images.csv"),
        predictions=per_test_set(".predictions.h5"),
    log:
        logs(f"evaluate/{run_flat()}.log"),
    benchmark:
        benchmarks(f"evaluate/{run_flat()}.tsv")
    conda:
        "../envs/workflow.yaml"
    threads: config["compute"]["threads"]
    params:
        **compute_params(),
        test_sets=TEST_SETS,
        # Only backbone-training regimes rebuild the backbone at test time.
        backbone=lambda w: config["backbones"][w.backbone] if REGIMES[w.regime].trains_backbone else {},
        datasets=train_datasets,
        keep_predictions=config["evaluation"]["save_predictions"],
        objects=config["evaluation"]["objects"],
        test_datasets=object_datasets(),
        code=code_digest("evaluate.py"),
    script:
        "../scripts/evaluate.py"
