"""Snakemake entry point: apply one trained model to unlabelled images (the target `predict`)."""

from pathlib import Path

from em_foundation.backbones import build_backbone
from em_foundation.backbones.hub import hub_environment
from em_foundation.data.generic import pixel_size_option
from em_foundation.data.prepared import pixel_size_of
from em_foundation.grid import parse_view
from em_foundation.predict import check_model_fits, predict_images, read_model_record, read_unlabelled
from em_foundation.regimes import REGIMES, reads_tokens
from em_foundation.runtime import configure
from em_foundation.scripting import job_settings, logged
from em_foundation.training.run import load_segmenter

with logged(snakemake.log[0]):
    params, run = snakemake.params, dict(snakemake.params.run)
    settings = job_settings(snakemake)
    device = configure(settings)
    spec = dict(params.backbone)
    regime = REGIMES[run["regime"]]
    with hub_environment(settings["hub_cache_dir"], offline=True):
        # tokens on the fly where the regime read the cache (the per-pixel forest's only on a ViT)
        backbone = build_backbone(spec) if reads_tokens(run["regime"], spec["family"]) else None
        saved = read_model_record(snakemake.input.model)
        check_model_fits(snakemake.input.model, saved, run["regime"], run["backbone"], spec, backbone)
        del saved
        model = load_segmenter(Path(snakemake.input.model), spec if regime.trains_backbone else {})
    given = params.predict["pixel_size_nm"]
    pixel_size = tuple(pixel_size_option(given)) if given is not None else pixel_size_of(snakemake.input.prepared)
    images = read_unlabelled(params.predict["images"])
    print(f"predicting {len(images)} image(s) from {params.predict['images']} with {snakemake.input.model}")
    result = predict_images(
        model,
        backbone,
        images,
        parse_view(params.view),
        Path(snakemake.output[0]),
        pixel_size,
        device,
        batch_size=params.batch_size,
        threshold=params.predict["threshold"],
        record={**run, "model": str(snakemake.input.model), "view": params.view},
        pixel_regime=regime.pixels,
        alignment=run["alignment"],
        reference=snakemake.input.get("reference"),
        percentiles=tuple(params.percentiles),
    )
    for entry in result["images"]:
        print(f"{entry['image']}: {entry['shape']}, foreground {entry['foreground_fraction']:.3f}")
