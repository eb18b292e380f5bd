# Domain analysis: how far apart the datasets lie in each backbone's feature space, and the
# figures and report pages drawn from it. Figures read CSV tables only, so `snakemake
# figures` redraws them in seconds without scheduling any feature or training job.

ANALYSIS_TABLES = ["frechet", "probe", "ood", "pca", "counts", "umap"]
ANALYSIS_FIGURE_NAMES = ["pca", "frechet", "probe"]
# The paired comparison needs a training set that unites several datasets.
if any(len(members) > 1 for members in config["training_sets"].values()):
    ANALYSIS_FIGURE_NAMES.append("paired")

ANALYSIS = expand(
    "results/analysis/{backbone}/{table}.csv", backbone=list(config["backbones"]), table=ANALYSIS_TABLES
) + expand("results/analysis/{backbone}/summary.json", backbone=list(config["backbones"]))
REPORT_TABLES = (
    ["results/report/summary.html"]
    + expand("results/report/datasets/{dataset}.html", dataset=list(config["datasets"]))
    + expand("results/report/analysis/{backbone}.html", backbone=list(config["backbones"]))
)
ANALYSIS_FIGURES = expand(
    "results/figures/{name}.{ext}", name=ANALYSIS_FIGURE_NAMES, ext=config["figures"]["formats"]
)
ANALYSIS += REPORT_TABLES


# Per figure, its outputs: the PNG into the HTML report with its caption, PDF/SVG for the paper.
ANALYSIS_FIGURE_OUTPUTS = {
    name: {
        ext: report(path, caption=f"../report/{name}.rst", category="Figures") if ext == "png" else path
        for ext in config["figures"]["formats"]
        for path in [f"results/figures/{name}.{ext}"]
    }
    for name in ["pca", "frechet", "probe", "paired"]
}
# Per table, that table of every backbone: what a figure reads.
ANALYSIS_TABLES_OF = {
    table: expand("results/analysis/{backbone}/{table}.csv", backbone=list(config["backbones"]), table=table)
    for table in ANALYSIS_TABLES
}


rule domain_analysis:
    input:
        unpack(lambda w: {f"tiles_{d}": tiles_path(w.backbone, d) for d in config["datasets"]}),
        **{f"features_{d}": f"results/features/{{backbone}}/{d}.h5" for d in config["datasets"]},
    output:
        **{table: f"results/analysis/{{backbone}}/{table}.csv" for table in ANALYSIS_TABLES},
        summary="results/analysis/{backbone}/summary.json",
    params:
        analysis=config["analysis"],
        after_featstd=any("featstd" in variant.split("-") for variant in config["alignment"]["variants"]),
        code=code_digest("analysis", *CORE),
    threads: config["compute"]["threads"]
    log:
        "results/logs/domain_analysis/{backbone}.log",
    benchmark:
        "results/benchmarks/domain_analysis/{backbone}.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/domain_analysis.py"


rule figure_pca:
    input:
        table=ANALYSIS_TABLES_OF["pca"],
        counts=ANALYSIS_TABLES_OF["counts"],
    output:
        **ANALYSIS_FIGURE_OUTPUTS["pca"],
    params:
        figures=config["figures"],
        code=code_digest("figures", *CORE),
    log:
        "results/logs/figures/pca.log",
    benchmark:
        "results/benchmarks/figures/pca.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/analysis_figure.py"


use rule figure_pca as figure_frechet with:
    input:
        table=ANALYSIS_TABLES_OF["frechet"],
    output:
        **ANALYSIS_FIGURE_OUTPUTS["frechet"],
    log:
        "results/logs/figures/frechet.log",
    benchmark:
        "results/benchmarks/figures/frechet.tsv"


use rule figure_pca as figure_probe with:
    input:
        table=ANALYSIS_TABLES_OF["probe"],
    output:
        **ANALYSIS_FIGURE_OUTPUTS["probe"],
    log:
        "results/logs/figures/probe.log",
    benchmark:
        "results/benchmarks/figures/probe.tsv"


use rule figure_pca as figure_paired with:
    input:
        table="results/tables/summary.csv",
    output:
        **ANALYSIS_FIGURE_OUTPUTS["paired"],
    params:
        figures=config["figures"],
        training_sets=config["training_sets"],
        code=code_digest("figures", *CORE),
    log:
        "results/logs/figures/paired.log",
    benchmark:
        "results/benchmarks/figures/paired.tsv"


rule report_tables:
    input:
        summary="results/tables/summary.csv",
        **{f"integrity_{d}": f"results/prepared/{d}.integrity.json" for d in config["datasets"]},
        **{f"analysis_{b}_{t}": f"results/analysis/{b}/{t}.csv" for b in config["backbones"] for t in ("counts", "frechet", "probe", "ood")},
    output:
        summary=report(
            "results/report/summary.html",
            caption="../report/summary_table.rst",
            category="Tables",
            labels={"table": "foreground IoU per cell"},
        ),
        **{
            f"dataset_{d}": report(
                f"results/report/datasets/{d}.html",
                caption="../report/dataset_integrity.rst",
                category="Datasets",
                labels={"dataset": d},
            )
            for d in config["datasets"]
        },
        **{
            f"analysis_{b}": report(
                f"results/report/analysis/{b}.html",
                caption="../report/analysis_tables.rst",
                category="Domain analysis",
                labels={"backbone": b},
            )
            for b in config["backbones"]
        },
    params:
        code=code_digest(*CORE),
    log:
        "results/logs/report_tables/report_tables.log",
    benchmark:
        "results/benchmarks/report_tables/report_tables.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/report_tables.py"
