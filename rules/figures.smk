# Figures: rebuilt from the tables alone (and a few saved predictions), in seconds.


rule figure_iou_bars:
    input:
        "results/tables/summary.csv",
    output:
        **figure_outputs("iou_bars"),
    params:
        figures=config["figures"],
        code=code_digest("figures", *CORE),
    log:
        "results/logs/figures/iou_bars.log",
    benchmark:
        "results/benchmarks/figures/iou_bars.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/figure.py"


use rule figure_iou_bars as figure_cross_domain with:
    output:
        **figure_outputs("cross_domain"),
    log:
        "results/logs/figures/cross_domain.log",
    benchmark:
        "results/benchmarks/figures/cross_domain.tsv"


use rule figure_iou_bars as figure_alignment with:
    output:
        **figure_outputs("alignment"),
    log:
        "results/logs/figures/alignment.log",
    benchmark:
        "results/benchmarks/figures/alignment.tsv"


use rule figure_iou_bars as figure_learning_curves with:
    input:
        "results/tables/training_logs.csv",
    output:
        **figure_outputs("learning_curves"),
    log:
        "results/logs/figures/learning_curves.log",
    benchmark:
        "results/benchmarks/figures/learning_curves.tsv"


rule figure_qualitative:
    input:
        prepared=expand("results/prepared/{dataset}.h5", dataset=TEST_SETS),
        predictions=[f"results/evaluation/{run.path}/{test_set}.predictions.h5" for test_set, run in qualitative_runs()],
    output:
        **figure_outputs("qualitative"),
    params:
        figures=config["figures"],
        panels=[{"test_set": test_set, "backbone": run.backbone, "regime": run.regime, "train_set": run.train_set} for test_set, run in qualitative_runs()],
        code=code_digest("figures", *CORE),
    log:
        "results/logs/figures/qualitative.log",
    benchmark:
        "results/benchmarks/figures/qualitative.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/figure.py"
