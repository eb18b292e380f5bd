"""Snakemake entry point: train one (backbone, regime, training set, alignment, seed) run."""

from pathlib import Path

from em_foundation.backbones.hub import hub_environment
from em_foundation.grid import n_train_slices_of
from em_foundation.runtime import configure
from em_foundation.scripting import job_settings, logged, unpack_prefixed
from em_foundation.training.run import train_run

with logged(snakemake.log[0]):
    w, p = snakemake.wildcards, snakemake.params
    settings = job_settings(snakemake)
    device = configure(settings)
    with hub_environment(settings["hub_cache_dir"], offline=True):
        record = train_run(
            regime=p.regime,
            backbone_name=w.backbone,
            train_set=w.train_set,
            datasets=list(p.datasets),
            seed=int(w.seed),
            backbone=dict(p.get("backbone", {})),
            head=dict(p.get("head", {})),
            lora=dict(p.get("lora", {})),
            training=dict(p.get("training", {})),
            forest=dict(p.get("forest", {})),
            pixelforest=dict(p.get("pixelforest", {})),
            alignment=w.alignment,
            threads=snakemake.threads,
            tiles=unpack_prefixed(snakemake.input, "tiles_"),
            features=unpack_prefixed(snakemake.input, "features_") or None,
            splits=unpack_prefixed(snakemake.input, "split_"),
            device=device,
            out_model=Path(snakemake.output.model),
            out_log=Path(snakemake.output.log),
            out_run=Path(snakemake.output.run),
            code=p.code,
            n_train_slices=n_train_slices_of(w.labels),
            data_in_memory=settings["data_in_memory"],
            settings=settings,
        )
    print(f"best epoch {record['best_epoch']} ({record['stop_reason']}), validation loss {record['best_val_loss']:.4f}")
