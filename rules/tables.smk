# Tables: every evaluation gathered in one place.


rule aggregate:
    input:
        metrics=EVALUATIONS,
        images=[path.replace(".json", ".images.csv") for path in EVALUATIONS],
        logs=[results(f"models/{run.path}/train_log.csv") for run in RUNS],
    output:
        runs=results("tables/runs.csv"),
        summary=results("tables/summary.csv"),
        markdown=results("tables/summary.md"),
        per_image=results("tables/per_image.csv"),
        training_logs=results("tables/training_logs.csv"),
    log:
        logs("aggregate/aggregate.log"),
    benchmark:
        benchmarks("aggregate/aggregate.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        n_boot=config["evaluation"]["n_boot"],
        boot_seed=config["evaluation"]["boot_seed"],
        folds=grid.fold_names(config),
        code=code_digest("aggregate.py"),
    script:
        "../scripts/aggregate.py"
