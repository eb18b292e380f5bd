# Evaluation: every trained model on every test set, at native resolution. One job per
# model scores all test sets, so the model (and for LoRA the backbone) is built once.

EVALUATION_STEM = "results/evaluation/{backbone}/{regime}/{train_set}/seed{seed}"


def evaluation_inputs(w):
    run = run_dir(w)
    inputs = {
        "model": f"{run}/model.pt",
        "run": f"{run}/run.json",
        "prepared": expand("results/prepared/{dataset}.h5", dataset=TEST_SETS),
        "tiles": expand("results/tiles/{dataset}.h5", dataset=TEST_SETS),
    }
    if w.regime in grid.CACHED_REGIMES:
        inputs["features"] = expand("results/features/{backbone}/{dataset}.h5", backbone=w.backbone, dataset=TEST_SETS)
    else:
        inputs["weights"] = weights_input(w)
    return inputs


def per_test_set(suffix):
    return [f"{EVALUATION_STEM}/{test_set}{suffix}" for test_set in TEST_SETS]


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
        "results/logs/evaluate/{backbone}_{regime}_{train_set}_seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate/{backbone}_{regime}_{train_set}_seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"
