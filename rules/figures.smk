# Figures: each rule names its figure (em_foundation/figures/registry.py) and passes the
# tables it reads; rebuilt from the tables alone (and a few saved predictions), in seconds.

FIGURE_NAMES = ["iou_bars", "cross_domain", "qualitative", "learning_curves"]
if set(config["alignment"]["variants"]) - {"none"}:
    FIGURE_NAMES.append("alignment")
# Label efficiency: only when some training set is trained at more than one size.
if any(len(grid.n_train_slices_for(config, t)) > 1 for t in config["training_sets"]):
    FIGURE_NAMES.append("label_efficiency")
# Domain figures: only with a backbone that has features (a config of U-Nets alone has none).
if FEATURE_BACKBONES:
    FIGURE_NAMES += ["pca", "frechet", "probe"]
# The paired comparison needs a training set that unites several datasets.
if any(len(members) > 1 for members in config["training_sets"].values()):
    FIGURE_NAMES.append("paired")
FIGURES = expand(results("figures/{name}.{ext}"), name=FIGURE_NAMES, ext=config["figures"]["formats"])


rule figure_iou_bars:
    input:
        table=results("tables/summary.csv"),
    output:
        **figure_outputs("iou_bars"),
    log:
        logs("figures/iou_bars.log"),
    benchmark:
        benchmarks("figures/iou_bars.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        **figure_params(
            "iou_bars",
            references=reference_runs(config),
            in_domain=in_domain_training_sets(config),
        ),
    script:
        "../scripts/figure.py"


use rule figure_iou_bars as figure_cross_domain with:
    output:
        **figure_outputs("cross_domain"),
    log:
        logs("figures/cross_domain.log"),
    benchmark:
        benchmarks("figures/cross_domain.tsv")
    params:
        **figure_params("cross_domain"),


use rule figure_iou_bars as figure_alignment with:
    output:
        **figure_outputs("alignment"),
    log:
        logs("figures/alignment.log"),
    benchmark:
        benchmarks("figures/alignment.tsv")
    params:
        **figure_params("alignment"),


use rule figure_iou_bars as figure_paired with:
    input:
        table=results("tables/summary.csv"),
        paired=results("tables/paired.csv"),
    output:
        **figure_outputs("paired"),
    log:
        logs("figures/paired.log"),
    benchmark:
        benchmarks("figures/paired.tsv")
    params:
        **figure_params("paired", training_sets=config["training_sets"]),


use rule figure_iou_bars as figure_label_efficiency with:
    output:
        **figure_outputs("label_efficiency"),
    log:
        logs("figures/label_efficiency.log"),
    benchmark:
        benchmarks("figures/label_efficiency.tsv")
    params:
        **figure_params("label_efficiency"),


use rule figure_iou_bars as figure_learning_curves with:
    input:
        table=results("tables/training_logs.csv"),
    output:
        **figure_outputs("learning_curves"),
    log:
        logs("figures/learning_curves.log"),
    benchmark:
        benchmarks("figures/learning_curves.tsv")
    params:
        **figure_params("learning_curves"),


use rule figure_iou_bars as figure_qualitative with:
    input:
        prepared=[prepared_path(dataset) for dataset in TEST_SETS],
        predictions=[
            results(f"evaluation/{run.path}/{test_set}.predictions.h5") for test_set, run in qualitative_runs()
        ],
    output:
        **figure_outputs("qualitative"),
    log:
        logs("figures/qualitative.log"),
    benchmark:
        benchmarks("figures/qualitative.tsv")
    params:
        **figure_params(
            "qualitative",
            panels=[
                {"test_set": test_set, "backbone": run.backbone, "regime": run.regime, "train_set": run.train_set}
                for test_set, run in qualitative_runs()
            ],
        ),


use rule figure_iou_bars as figure_pca with:
    input:
        table=analysis_tables("pca"),
        counts=analysis_tables("counts"),
    output:
        **figure_outputs("pca"),
    log:
        logs("figures/pca.log"),
    benchmark:
        benchmarks("figures/pca.tsv")
    params:
        **figure_params("pca"),


use rule figure_iou_bars as figure_frechet with:
    input:
        table=analysis_tables("frechet"),
    output:
        **figure_outputs("frechet"),
    log:
        logs("figures/frechet.log"),
    benchmark:
        benchmarks("figures/frechet.tsv")
    params:
        **figure_params("frechet"),


use rule figure_iou_bars as figure_probe with:
    input:
        table=analysis_tables("probe"),
    output:
        **figure_outputs("probe"),
    log:
        logs("figures/probe.log"),
    benchmark:
        benchmarks("figures/probe.tsv")
    params:
        **figure_params("probe"),
