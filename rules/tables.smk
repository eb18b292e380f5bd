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
        paired=results("tables/paired.csv"),
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
        block_length=config["evaluation"]["block_length"],
        min_images=config["evaluation"]["min_images"],
        folds=grid.fold_names(config),
        code=code_digest("aggregate.py"),
    script:
        "../scripts/aggregate.py"
