"""A trained segmenter as a BioImage Model Zoo model (bioimage.io, format 0.5), built with ``bioimageio.spec``.

Users apply models in napari, ilastik, deepImageJ and QuPath through this format, so a run
that leaves the workflow leaves as one package: the weights (``pytorch_state_dict`` of
``BioimageioSegmenter``, and TorchScript where the model traces), the input preprocessing
(8-bit EM slices scaled to [0, 1], the tensor the workflow trains on; the family's own
normalisation happens inside the model, as in every rule), the pixel size, a test input and
its output from a held-out slice, citations, the training recipe and the scores.

Output: the foreground (mitochondria) probability, one channel, at the input's size.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# The study whose workflow this is, cited in every package (experiment.md).
STUDY_CITATION = {
    "text": "Are vision foundation models foundational for electron microscopy segmentation? (workflow of this repository)",
    "url": "https://github.com/em-foundation/em-foundation",
}
# Each family's own paper, cited beside the study.
FAMILY_CITATIONS = {
    "unet": (
        "Ronneberger et al., U-Net (2015); Iakubovskii, segmentation-models-pytorch",
        "10.1007/978-3-319-24574-4_28",
    ),
    "dinov2": ("Oquab et al., DINOv2 (2023)", "10.48550/arXiv.2304.07193"),
    "dinov3": ("Simeoni et al., DINOv3 (2025)", "10.48550/arXiv.2508.10104"),
    "openclip": ("Cherti et al., Reproducible scaling laws for CLIP (2023)", "10.48550/arXiv.2212.07143"),
    "sam": ("Kirillov et al., Segment Anything (2023)", "10.48550/arXiv.2304.02643"),
    "sam2": ("Ravi et al., SAM 2 (2024)", "10.48550/arXiv.2408.00714"),
    "filterbank": ("Berg et al., ilastik (2019)", "10.1038/s41592-019-0582-9"),
}


class BioimageioSegmenter(nn.Module):
    """(B, 1, Y, X) in [0, 1] to the foreground probability (B, 1, Y, X): what the package's weights load into.

    ``backbone`` is the run's config entry with ``weights: random`` (the package's state dict
    holds every weight, the frozen backbone's included, so nothing is fetched);
    ``segmenter`` the other arguments of ``training.build_segmenter``.
    """

    def __init__(self, regime: str, backbone: dict[str, Any], segmenter: dict[str, Any]) -> None:
        from em_foundation.training.segmenter import build_segmenter

        super().__init__()
        self.segmenter = build_segmenter(
            regime,
            backbone,
            segmenter.get("head") or {},
            segmenter.get("lora") or {},
            segmenter.get("in_channels"),
            segmenter.get("patch_size"),
            segmenter.get("input_standardisation"),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.segmenter(images, (int(images.shape[-2]), int(images.shape[-1])))
        return torch.softmax(logits, dim=1)[:, 1:2]


def packaged_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    """The config entry the package rebuilds: its weights come from the state dict, so none are fetched."""
    spec = copy.deepcopy(backbone)
    spec["weights"] = "random"
    spec.pop("revision", None)
    return spec


def load_packaged(model_path: Path, backbone: dict[str, Any]) -> tuple[BioimageioSegmenter, dict[str, Any]]:
    """A trained run's model.pt as a BioimageioSegmenter (LoRA adapters merged) and its constructor kwargs."""
    from em_foundation.training.run import load_segmenter

    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    regime = saved["regime"]
    if regime in ("forest", "pixelforest"):
        raise ValueError(f"{model_path}: a {regime} run is not a torch model; bioimage.io export needs a torch regime")
    trained = load_segmenter(model_path, backbone)
    config = saved["config"]
    segmenter = {
        "head": config.get("head") or {},
        "lora": {},  # adapters are merged into the backbone's weights below
        "in_channels": saved["in_channels"],
        "patch_size": saved["patch_size"],
        "input_standardisation": saved.get("input_standardisation"),
    }
    if regime == "lora":
        merge_lora(trained)
        regime = "fullft"  # the same network with its adapted weights folded in
    kwargs = {"regime": regime, "backbone": packaged_backbone(backbone), "segmenter": segmenter}
    wrapper = BioimageioSegmenter(**kwargs)
    state = trained.state_dict()
    result = wrapper.segmenter.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"{model_path}: the packaged model does not take the trained weights: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return wrapper.eval(), kwargs


def merge_lora(model: nn.Module) -> None:
    """Fold every peft LoRA layer into its base weight (W + BA), leaving plain modules.

    The adapters were injected with ``peft.inject_adapter_in_model`` (no PeftModel, so no
    ``merge_and_unload``): each LoRA layer merges itself and is replaced by its base layer.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def export_bioimageio(
    *,
    model_path: Path,
    backbone_name: str,
    backbone: dict[str, Any],
    run: dict[str, Any],
    scores: dict[str, dict[str, float]],
    test_slice: np.ndarray,
    pixel_size_nm: float,
    out_zip: Path,
    work_dir: Path,
) -> Path:
    """Write ``out_zip``, a bioimage.io model package of the trained run at ``model_path``.

    ``test_slice``: a held-out 2-D uint8 slice (the package's test input; its output is this
    model's prediction of it). ``scores``: metric values per test set, recorded in the
    description. The package is written under a temporary name and renamed when complete.
    """
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5

    wrapper, kwargs = load_packaged(model_path, backbone)
    work_dir.mkdir(parents=True, exist_ok=True)
    image = np.asarray(test_slice)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"test slice must be a 2-D uint8 image, got {image.dtype} {image.shape}")
    # the description's data type is the model's input after preprocessing (the spec appends an
    # ensure_dtype to it), so the package takes float32 0-255 values; 8-bit slices are cast first
    test_input = image[None, None].astype(np.float32)
    with torch.no_grad():
        test_output = wrapper(torch.from_numpy(test_input / 255.0)).numpy()
    np.save(work_dir / "test_input.npy", test_input)
    np.save(work_dir / "test_output.npy", test_output)
    weights_file = work_dir / "weights.pt"
    torch.save(wrapper.state_dict(), weights_file)
    torchscript = work_dir / "weights_torchscript.pt"
    try:
        traced = torch.jit.trace(wrapper, torch.from_numpy(test_input / 255.0), check_trace=False)
        traced.save(str(torchscript))
        has_torchscript = True
    except Exception as error:  # some backbones do not trace (data-dependent shapes): state dict only
        print(f"TorchScript export skipped: {type(error).__name__}: {str(error)[:200]}")
        has_torchscript = False

    step = int(getattr(wrapper.segmenter, "patch_size", 16) or 16)
    spatial = v0_5.ParameterizedSize(min=step, step=step)
    input_axes = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier("em")]),
        v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=spatial, unit="nanometer", scale=pixel_size_nm),
        v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=spatial, unit="nanometer", scale=pixel_size_nm),
    ]
    input_tensor = v0_5.InputTensorDescr(
        id=v0_5.TensorId("raw"),
        description="an 8-bit EM slice (0-255); scaled to [0, 1] as the workflow trains",
        axes=input_axes,
        test_tensor=v0_5.FileDescr(source=work_dir / "test_input.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32")),
            v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=1 / 255, offset=0.0)),
        ],
    )
    output_axes = [
        v0_5.BatchAxis(),
        v0_5.ChannelAxis(channel_names=[v0_5.Identifier("mitochondria")]),
        v0_5.SpaceOutputAxis(
            id=v0_5.AxisId("y"),
            size=v0_5.SizeReference(tensor_id=v0_5.TensorId("raw"), axis_id=v0_5.AxisId("y")),
            unit="nanometer",
            scale=pixel_size_nm,
        ),
        v0_5.SpaceOutputAxis(
            id=v0_5.AxisId("x"),
            size=v0_5.SizeReference(tensor_id=v0_5.TensorId("raw"), axis_id=v0_5.AxisId("x")),
            unit="nanometer",
            scale=pixel_size_nm,
        ),
    ]
    output_tensor = v0_5.OutputTensorDescr(
        id=v0_5.TensorId("probability"),
        description="foreground (mitochondria) probability; threshold at 0.5 for the workflow's masks",
        axes=output_axes,
        test_tensor=v0_5.FileDescr(source=work_dir / "test_output.npy"),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    pytorch_version = v0_5.Version(torch.__version__.split("+")[0])
    weights = v0_5.WeightsDescr(
        pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
            source=weights_file,
            architecture=v0_5.ArchitectureFromLibraryDescr(
                callable=v0_5.Identifier("BioimageioSegmenter"),
                import_from="em_foundation.export.bioimageio",
                kwargs=kwargs,
            ),
            pytorch_version=pytorch_version,
        ),
        torchscript=(
            v0_5.TorchscriptWeightsDescr(
                source=torchscript, pytorch_version=pytorch_version, parent="pytorch_state_dict"
            )
            if has_torchscript
            else None
        ),
    )
    family = str(backbone["family"])
    family_text, family_doi = FAMILY_CITATIONS.get(family, (family, None))
    regime = str(run.get("regime"))
    readme = work_dir / "README.md"
    readme.write_text(readme_text(backbone_name, backbone, run, scores, pixel_size_nm))
    description = v0_5.ModelDescr(
        name=f"EM mitochondria {backbone_name} {regime} {run.get('train_set')} seed {run.get('seed')}",
        description=(
            f"Mitochondria segmentation of EM slices: {backbone_name} ({family}), regime {regime}, trained on "
            f"{run.get('train_set')}; exported by the em-foundation workflow."
        ),
        authors=[v0_5.Author(name="em-foundation workflow")],
        cite=[
            v0_5.CiteEntry(text=STUDY_CITATION["text"], url=STUDY_CITATION["url"]),
            v0_5.CiteEntry(text=family_text, doi=v0_5.Doi(family_doi)) if family_doi else None,
        ][: 2 if family_doi else 1],
        license=v0_5.LicenseId("MIT"),
        tags=["electron-microscopy", "mitochondria", "semantic-segmentation", family, regime],
        inputs=[input_tensor],
        outputs=[output_tensor],
        weights=weights,
        training_data=None,
        config={
            "em_foundation": {
                "backbone_name": backbone_name,
                "backbone": backbone,
                "training_recipe": {k: run.get(k) for k in sorted(run) if k not in ("data", "data_loading")},
                "scores": scores,
                "pixel_size_nm": pixel_size_nm,
            }
        },
    )
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    partial = out_zip.with_name(out_zip.name + ".partial.zip")
    save_bioimageio_package(description, output_path=partial)
    partial.replace(out_zip)
    return out_zip


def readme_text(
    backbone_name: str, backbone: dict[str, Any], run: dict[str, Any], scores: dict[str, dict[str, float]], pixel: float
) -> str:
    lines = [
        f"# {backbone_name} ({backbone['family']}), regime {run.get('regime')}",
        "",
        f"Trained on {run.get('train_set')} (seed {run.get('seed')}, alignment {run.get('alignment')}) by the",
        "em-foundation Snakemake workflow. Input: an 8-bit EM slice at "
        f"{pixel} nm per pixel; output: the mitochondria probability.",
        "",
        "## Scores on each test set",
        "",
        "| test set | " + " | ".join(sorted({m for s in scores.values() for m in s})) + " |",
    ]
    metrics = sorted({m for s in scores.values() for m in s})
    lines.append("|" + "---|" * (len(metrics) + 1))
    for test_set, values in sorted(scores.items()):
        lines.append(f"| {test_set} | " + " | ".join(f"{values.get(m, float('nan')):.4f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def scores_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric scores of an evaluation's metrics JSON (its top-level numbers)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def export_from_workflow(
    *,
    model_path: Path,
    run_path: Path,
    metrics_paths: list[Path],
    prepared_path: Path,
    backbone_name: str,
    backbone: dict[str, Any],
    out_zip: Path,
) -> Path:
    """The export_bioimageio rule: a run's files in, its package out (work files beside it, then removed)."""
    import shutil
    import tempfile

    from em_foundation.data.prepared import read_attrs, read_split
    from em_foundation.io import read_json

    scores = {Path(p).stem: scores_of(read_json(p)) for p in metrics_paths}
    held_out = read_split(prepared_path, "test").raw[0]  # prepared slices are 8-bit (data.prepared)
    pixel = read_attrs(prepared_path).get("pixel_size_nm")
    if isinstance(pixel, (str, bytes)):  # prepared files store lists as JSON text
        import json

        pixel = json.loads(pixel)
    pixel_size = float(np.mean(np.asarray(pixel, dtype=float))) if pixel is not None else 1.0
    Path(out_zip).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=Path(out_zip).parent))
    try:
        return export_bioimageio(
            model_path=model_path,
            backbone_name=backbone_name,
            backbone=backbone,
            run=read_json(run_path),
            scores=scores,
            test_slice=held_out,
            pixel_size_nm=pixel_size,
            out_zip=out_zip,
            work_dir=work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
