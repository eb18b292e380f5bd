# Figures: rebuilt from the tables alone (and a few saved predictions), in seconds.


def qualitative_runs():
    """Per test set, the in-domain single-dataset models of the first seed, one per backbone × regime."""
    chosen = []
    seed = config["seeds"][0]
    for test_set in TEST_SETS:
        own = [name for name, members in config["training_sets"].items() if members == [test_set]]
        containing = [name for name, members in config["training_sets"].items() if test_set in members]
        train_set = (own or containing or list(config["training_sets"]))[0]
        for run in RUNS:
            if run.train_set == train_set and run.seed == seed:
                chosen.append((test_set, run))
    return chosen


def figure_outputs(name):
    """PNG goes into the HTML report; PDF is for the paper."""
    outputs = {}
    for ext in config["figures"]["formats"]:
        path = f"results/figures/{name}.{ext}"
        outputs[ext] = report(path, caption=f"../report/{name}.rst", category="Figures") if ext == "png" else path
    return outputs


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
