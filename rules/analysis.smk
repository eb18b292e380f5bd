# Domain analysis: how far apart the datasets lie in each backbone's feature space, and the
# report pages drawn from it. Figures read CSV tables only (rules/figures.smk), so
# `snakemake figures` redraws them in seconds without scheduling any feature or training job.

ANALYSIS_TABLES = ["frechet", "probe", "ood", "pca", "counts", "umap"]
REPORT_ANALYSIS_TABLES = ["counts", "frechet", "probe", "ood"]

REPORT_TABLES = (
    [results("report/summary.html")]
    + expand(results("report/datasets/{dataset}.html"), dataset=list(config["datasets"]))
    + expand(results("report/analysis/{backbone}.html"), backbone=FEATURE_BACKBONES)
)
ANALYSIS = (
    expand(results("analysis/{backbone}/{table}.csv"), backbone=FEATURE_BACKBONES, table=ANALYSIS_TABLES)
    + expand(results("analysis/{backbone}/summary.json"), backbone=FEATURE_BACKBONES)
    + REPORT_TABLES
)


rule domain_analysis:
    input:
        unpack(domain_inputs),
    output:
        **{table: results(f"analysis/{{backbone}}/{table}.csv") for table in ANALYSIS_TABLES},
        summary=results("analysis/{backbone}/summary.json"),
    log:
        logs("domain_analysis/{backbone}.log"),
    benchmark:
        benchmarks("domain_analysis/{backbone}.tsv")
    conda:
        "../envs/workflow.yaml"
    threads: config["compute"]["threads"]
    params:
        analysis=config["analysis"],
        after_featstd=any("featstd" in variant.split("-") for variant in config["alignment"]["variants"]),
        code=code_digest("domain_analysis.py"),
    script:
        "../scripts/domain_analysis.py"


rule report_tables:
    input:
        **{f"integrity_{d}": results(f"prepared/{d}.integrity.json") for d in config["datasets"]},
        **{
            f"analysis_{b}_{t}": results(f"analysis/{b}/{t}.csv")
            for b in FEATURE_BACKBONES
            for t in REPORT_ANALYSIS_TABLES
        },
        summary=results("tables/summary.csv"),
    output:
        **{
            f"dataset_{d}": report_page(
                results(f"report/datasets/{d}.html"), "dataset_integrity", "Datasets", dataset=d
            )
            for d in config["datasets"]
        },
        **{
            f"analysis_{b}": report_page(
                results(f"report/analysis/{b}.html"), "analysis_tables", "Domain analysis", backbone=b
            )
            for b in FEATURE_BACKBONES
        },
        summary=report_page(results("report/summary.html"), "summary_table", "Tables", table="foreground IoU per cell"),
    log:
        logs("report_tables/report_tables.log"),
    benchmark:
        benchmarks("report_tables/report_tables.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        backbones=FEATURE_BACKBONES,
        tables=REPORT_ANALYSIS_TABLES,
        code=code_digest("report_tables.py"),
    script:
        "../scripts/report_tables.py"
