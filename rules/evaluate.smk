# Evaluation: every trained model on every test set, at native resolution. One job per
# model scores all test sets, so the model (and for LoRA the backbone) is built once.

rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=per_test_set(".json"),
        images=per_test_set(".images.csv"),
        predictions=per_test_set(".predictions.h5"),
    params:
        test_sets=TEST_SETS,
        # Only backbone-training regimes rebuild the backbone at test time.
        backbone=lambda w: config["backbones"][w.backbone] if w.regime in grid.BACKBONE_REGIMES else {},
        datasets=train_datasets,
        keep_predictions=config["evaluation"]["save_predictions"],
        code=code_digest("evaluation", "training", "heads", "features.py", "data", "backbones", *CORE),
    threads: config["compute"]["threads"]
    log:
        "results/logs/evaluate/{backbone}_{regime}_{train_set}_{alignment}_seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate/{backbone}_{regime}_{train_set}_{alignment}_seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"
