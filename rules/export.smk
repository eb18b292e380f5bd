# Models that leave the workflow: a trained run as a BioImage Model Zoo package (bioimage.io
# model 0.5) for napari, ilastik, deepImageJ and QuPath. Not part of `all`; ask for a run's
# package, e.g. snakemake results/export/unetR50IN/supervised/lucchi/none/seed0.bioimageio.zip


rule export_bioimageio:
    input:
        model=model_path("model.pt"),
        run=model_path("run.json"),
        metrics=per_test_set(".json"),
        prepared=lambda w: prepared_path(train_datasets(w)[0]),
    output:
        results(f"export/{run_path()}.bioimageio.zip"),
    log:
        logs(f"export_bioimageio/{run_flat()}.log"),
    benchmark:
        benchmarks(f"export_bioimageio/{run_flat()}.tsv")
    conda:
        "../envs/workflow.yaml"
    params:
        # the hub cache is read in the job (scripting.job_settings): no rerun trigger
        backbone=lambda w: config["backbones"][w.backbone],
        code=code_digest("export.py"),
    script:
        "../scripts/export.py"
