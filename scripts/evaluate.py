"""Snakemake entry point: score one trained model on every test set at native resolution."""

from pathlib import Path

from em_foundation.backbones.hub import citation_text, hub_environment
from em_foundation.data.prepared import pixel_size_of
from em_foundation.data.registry import has_stack_test_split
from em_foundation.evaluation.evaluate import evaluate_model, stack_object_counts, write_evaluation
from em_foundation.evaluation.objects import min_object_size
from em_foundation.grid import n_train_slices_of
from em_foundation.io import read_json
from em_foundation.runtime import configure
from em_foundation.scripting import job_settings, logged
from em_foundation.training.recipe import recipe_text
from em_foundation.training.run import load_segmenter

with logged(snakemake.log[0]):
    settings = job_settings(snakemake)
    device = configure(settings)
    w, inputs, outputs, params = snakemake.wildcards, snakemake.input, snakemake.output, snakemake.params
    with hub_environment(settings["hub_cache_dir"], offline=True):
        model = load_segmenter(Path(inputs.model), dict(params.backbone))
    trained = read_json(inputs.run)
    for k, test_set in enumerate(params.test_sets):
        features = inputs.features[k] if "features" in inputs.keys() else None
        spec = dict(params.test_datasets[test_set])
        # an area in nm² needs the pixel size the prepared dataset records
        pixel_size = pixel_size_of(inputs.prepared[k]) if params.objects.get("min_area_nm2") else None
        min_size = min_object_size(dict(params.objects), pixel_size, test_set)
        per_image, predictions = evaluate_model(
            model,
            w.regime,
            inputs.prepared[k],
            inputs.tiles[k],
            features,
            device,
            alignment=w.alignment,
            min_object_size=min_size,
            data_in_memory=settings["data_in_memory"],
            decision=trained.get("decision"),  # chosen on the run's validation slices (training/run.py)
        )
        stack = has_stack_test_split(spec)
        objects_3d = stack_object_counts(inputs.prepared[k], predictions, min_size) if stack else None
        record = {
            "backbone": w.backbone,
            "regime": w.regime,
            "train_set": w.train_set,
            "alignment": w.alignment,
            "seed": int(w.seed),
            "n_train_slices": n_train_slices_of(w.labels),
            # how many labelled slices the model really trained on (all sources; 'all' made a number)
            "n_labelled_slices": int(trained.get("n_labelled_slices", -1)),
            # and the labelled slices it validated on (early stopping, thresholds): the label-efficiency x-axis
            "n_validation_slices": int(trained.get("n_validation_slices", -1)),
            "augment": trained.get("augment", "none"),
            "recipe": recipe_text(trained.get("recipe")),  # lr, batch size, ... (training.overrides applied)
            "weights": citation_text(trained.get("weights_manifest")),  # the manifest entry of its weights
            "test_set": test_set,
            "train_datasets": list(params.datasets),
            # the decision rules of the _tuned and _post columns (NaN: a run trained before they existed)
            "threshold_tuned": float(trained.get("decision", {}).get("threshold", "nan")),
            "min_size_post": float(trained.get("decision", {}).get("min_size_px", "nan")),
        }
        metrics = write_evaluation(
            per_image,
            predictions,
            record,
            Path(outputs.metrics[k]),
            Path(outputs.images[k]),
            Path(outputs.predictions[k]),
            params.keep_predictions,
            objects_3d,
        )
        print(
            f"{test_set}: foreground IoU {metrics['fg_iou']:.4f} over {metrics['n_pixels']} pixels of {metrics['n_images']} slices; "
            f"object F1 {metrics['obj_f1']:.4f} (2-D, min size {min_size} px)"
            + (f", {metrics['obj_f1_3d']:.4f} (3-D)" if stack else "")
            + (
                f"; at the validation threshold {metrics['threshold_tuned']:.2f}: IoU {metrics['fg_iou_tuned']:.4f}, "
                f"object F1 {metrics['obj_f1_tuned']:.4f}, post-processed {metrics['obj_f1_post']:.4f}"
                if "fg_iou_tuned" in metrics
                else ""
            )
        )
