# Evaluation: every trained model on every test set, at native resolution.


def evaluation_inputs(w):
    inputs = {
        "model": f"results/models/{w.backbone}/{w.regime}/{w.train_set}/seed{w.seed}/model.pt",
        "run": f"results/models/{w.backbone}/{w.regime}/{w.train_set}/seed{w.seed}/run.json",
        "prepared": f"results/prepared/{w.test_set}.h5",
        "tiles": f"results/tiles/{w.test_set}.h5",
    }
    if w.regime in grid.CACHED_REGIMES:
        inputs["features"] = f"results/features/{w.backbone}/{w.test_set}.h5"
    else:
        inputs["weights"] = weights_input(w)
    return inputs


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics="results/evaluation/{backbone}/{regime}/{train_set}/seed{seed}/{test_set}.json",
        images="results/evaluation/{backbone}/{regime}/{train_set}/seed{seed}/{test_set}.images.csv",
        predictions="results/evaluation/{backbone}/{regime}/{train_set}/seed{seed}/{test_set}.predictions.h5",
    params:
        # Only backbone-training regimes rebuild the backbone at test time.
        backbone=lambda w: config["backbones"][w.backbone] if w.regime in grid.BACKBONE_REGIMES else {},
        datasets=train_datasets,
        keep_predictions=config["evaluation"]["save_predictions"],
        code=code_digest("evaluation", "training", "heads", "features.py", "data", "backbones", *CORE),
    threads: config["compute"]["threads"]
    log:
        "results/logs/evaluate/{backbone}_{regime}_{train_set}_seed{seed}_{test_set}.log",
    benchmark:
        "results/benchmarks/evaluate/{backbone}_{regime}_{train_set}_seed{seed}_{test_set}.tsv"
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"
