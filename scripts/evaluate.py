"""Snakemake entry point: score one trained model on one test set at native resolution."""

from pathlib import Path

from em_foundation.backbones.weights import hub_environment
from em_foundation.evaluation.evaluate import evaluate_model, write_evaluation
from em_foundation.runtime import configure
from em_foundation.scripting import logged
from em_foundation.training.run import load_segmenter

with logged(snakemake.log[0]):
    device = configure({**snakemake.config["compute"], "threads": snakemake.threads})
    w, inputs = snakemake.wildcards, snakemake.input
    with hub_environment(snakemake.config["hub"]["cache_dir"], offline=True):
        model = load_segmenter(Path(inputs.model), dict(snakemake.params.backbone))
    per_image, predictions = evaluate_model(
        model, w.regime, inputs.prepared, inputs.tiles, inputs.get("features"), device
    )
    record = {
        "backbone": w.backbone, "regime": w.regime, "train_set": w.train_set, "seed": int(w.seed),
        "test_set": w.test_set, "train_datasets": list(snakemake.params.datasets),
    }
    metrics = write_evaluation(
        per_image, predictions, record, Path(snakemake.output.metrics), Path(snakemake.output.images),
        Path(snakemake.output.predictions), snakemake.params.keep_predictions,
    )
    print(f"foreground IoU {metrics['fg_iou']:.4f} over {metrics['n_pixels']} pixels of {metrics['n_images']} slices")
