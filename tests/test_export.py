"""BioImage Model Zoo export: a demo-sized trained U-Net packaged and run through bioimageio.core's own model test."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from em_foundation.data.prepared import read_split
from em_foundation.training.run import train_run
from tests.helpers import HEAD, LORA, TINY_VIT, TRAINING, make_dataset

pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed (pip install bioimageio.core)")

UNET = {
    "family": "unet",
    "weights": "random",
    "options": {"encoder": "resnet18", "encoder_depth": 2, "decoder_channels": [8, 8]},
}


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root, "fibsem", "fibsem", n_train=3, n_test=1, size=128, seed=1)
    out = root / "run"
    out.mkdir()
    run = train_run(
        regime="supervised",
        backbone_name="unetR18",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone=UNET,
        head={},
        lora={},
        training={**TRAINING, "max_epochs": 1},
        tiles={"fibsem": data["tiles"]},
        features=None,
        splits={"fibsem": str(root / "fibsem.split0.json")},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
    )
    return root, data, run


def test_unet_package_passes_bioimageio_core_model_test(trained_unet):
    """The export rule's logic on a demo-sized run, then bioimageio.core's own test_model on the package."""
    import json

    import pydantic
    from bioimageio.core import test_model

    from em_foundation.export.bioimageio import export_from_workflow

    root, data, run = trained_unet
    metrics = root / "evaluation" / "fibsem.json"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text(json.dumps({"test_set": "fibsem", "iou": 0.5, "dice": 0.66}))
    out = root / "export" / "unetR18.bioimageio.zip"
    try:
        package = export_from_workflow(
            model_path=root / "run" / "model.pt",
            run_path=root / "run" / "run.json",
            metrics_paths=[metrics],
            prepared_path=Path(data["prepared"]),
            backbone_name="unetR18",
            backbone=UNET,
            out_zip=out,
        )
    except pydantic.ValidationError as error:
        if "'index_key' is expected to be an integer or a string" not in str(error):
            raise
        pytest.skip(
            f"bioimageio.spec's package_file_descr_serializer calls handler(value, info), which pydantic "
            f"{pydantic.VERSION} rejects; the export environment pins pydantic>=2.11,<2.12 (pyproject extra 'export')"
        )
    assert package == out and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial zip, no work folder
    archive = zipfile.ZipFile(package)
    names = archive.namelist()
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "test_input.npy", "test_output.npy"} <= set(names)
    rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert rdf["config"]["em_foundation"]["scores"] == {"fibsem": {"iou": 0.5, "dice": 0.66}}
    assert rdf["config"]["em_foundation"]["training_recipe"]["regime"] == "supervised"
    assert rdf["inputs"][0]["axes"][2]["unit"] == "nanometer"
    held_out = read_split(data["prepared"], "test").raw[0]
    np.testing.assert_array_equal(np.load(io.BytesIO(archive.read("test_input.npy")))[0, 0], held_out)
    summary = test_model(package)
    assert summary.status == "passed", summary.format()
    tested = " ".join(d.name for d in summary.details)
    assert "pytorch_state_dict" in tested and "torchscript" in tested, tested


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-lora")
    data = make_dataset(root, "fibsem", "fibsem", n_train=3, n_test=1, seed=1)
    out = root / "run"
    out.mkdir()
    train_run(
        regime="lora",
        backbone_name="tinyvit",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone=TINY_VIT,
        head=HEAD,
        lora=LORA,
        training={**TRAINING, "max_epochs": 1},
        tiles={"fibsem": data["tiles"]},
        features={"fibsem": data["features"]},
        splits={"fibsem": str(root / "fibsem.split0.json")},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
    )
    return root, data


def test_lora_adapters_are_merged_into_the_packaged_weights(trained_lora):
    """A frozen ViT with LoRA adapters and its head: the packaged network has the adapters folded
    into its weights (no peft needed by the consumer) and gives the trained model's probabilities.
    (Packaging a ViT is not yet done: bioimageio.core tests input sizes that are no patch multiple.)"""
    from em_foundation.export.bioimageio import load_packaged
    from em_foundation.training.run import load_segmenter

    root, data = trained_lora
    packaged, _ = load_packaged(root / "run" / "model.pt", TINY_VIT)
    assert not any("lora_" in name for name in packaged.state_dict()), "adapters are merged, not shipped"
    trained = load_segmenter(root / "run" / "model.pt", TINY_VIT).eval()
    tile = torch.rand(1, 1, 112, 112)
    with torch.no_grad():
        reference = torch.softmax(trained(tile, (112, 112)), dim=1)[:, 1:2]
        merged = packaged.eval()(tile)
    torch.testing.assert_close(merged, reference, atol=1e-4, rtol=1e-4)
