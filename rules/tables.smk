# Tables: every evaluation gathered in one place.


rule aggregate:
    input:
        metrics=EVALUATIONS,
        images=[path.replace(".json", ".images.csv") for path in EVALUATIONS],
        logs=expand("results/models/{run}/train_log.csv", run=[run.path for run in RUNS]),
    output:
        runs="results/tables/runs.csv",
        summary="results/tables/summary.csv",
        markdown="results/tables/summary.md",
        per_image="results/tables/per_image.csv",
        training_logs="results/tables/training_logs.csv",
    params:
        n_boot=config["evaluation"]["n_boot"],
        boot_seed=config["evaluation"]["boot_seed"],
        folds=grid.fold_names(config),
        code=code_digest("tables.py", "grid.py", "evaluation/metrics.py", *CORE),
    log:
        "results/logs/aggregate/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate/aggregate.tsv"
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/aggregate.py"
