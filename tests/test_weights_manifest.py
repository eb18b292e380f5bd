"""The weights manifest: what fetch_weights fetched, verified by every compute rule that reads it.

A local fake Hugging Face cache stands in for the hub (the layout huggingface_hub writes,
pinned to a commit, so nothing is downloaded); the licence look-up is replaced by the value
a model card would give.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from em_foundation.backbones import build_backbone
from em_foundation.backbones import hub as hub_module
from em_foundation.backbones.hub import (
    WeightsError,
    fetch_weights,
    file_sha256,
    hub_environment,
    manifest_citation,
    manifest_path,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = {
    "family": "dinov2",
    "model": "vit_small_patch14_reg4_dinov2.lvd142m",
    "weights": "pretrained",
    "revision": COMMIT,
    "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56},
}
REPO_ID = f"timm/{SPEC['model']}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A weights cache holding the pinned snapshot of SPEC's model, as after a download."""
    monkeypatch.setattr(hub_module, "hub_licence", lambda repo_id, revision: "apache-2.0")
    random = build_backbone({**SPEC, "weights": "random"})
    root = tmp_path / "weights"
    path = root / "huggingface" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(path / "model.safetensors"))
    return root


def test_fetch_writes_the_manifest_entry(cache):
    record = fetch_weights(SPEC, cache, "dinov2S")
    path = manifest_path(cache)
    assert record["manifest"] == str(path) and path.parent == cache.resolve()
    manifest = json.loads(path.read_text())
    entry = manifest["backbones"]["dinov2S"]
    weights = cache.resolve() / "huggingface/hub" / f"models--{REPO_ID.replace('/', '--')}/snapshots/{COMMIT}"
    assert entry["repository"] == REPO_ID and entry["revision"] == COMMIT and entry["commit"] == COMMIT
    assert entry["licence"] == "apache-2.0"
    assert entry["files"] == [
        {
            "name": "model.safetensors",
            "path": f"huggingface/hub/models--{REPO_ID.replace('/', '--')}/snapshots/{COMMIT}/model.safetensors",
            "bytes": (weights / "model.safetensors").stat().st_size,
            "sha256": file_sha256(weights / "model.safetensors"),
        }
    ]
    # a second backbone joins the first; no temporary file is left beside the manifest
    fetch_weights({**SPEC, "model_kwargs": {**SPEC["model_kwargs"], "depth": 1}}, cache, "dinov2S_shallow")
    assert set(json.loads(path.read_text())["backbones"]) == {"dinov2S", "dinov2S_shallow"}
    assert sorted(p.name for p in cache.iterdir()) == ["huggingface", "manifest.json", "manifest.json.lock"]


def test_compute_rules_verify_the_file_against_the_manifest(cache, tmp_path):
    fetch_weights(SPEC, cache, "dinov2S")
    with hub_environment(cache, offline=True):
        backbone = build_backbone(SPEC)
        citation = manifest_citation(backbone.identity)
    assert citation["backbone"] == "dinov2S" and citation["manifest"] == str(manifest_path(cache))
    assert citation["identity"] == f"hf:{REPO_ID}@{COMMIT}/model.safetensors"
    assert (
        citation["files"][0]["sha256"]
        == json.loads(manifest_path(cache).read_text())["backbones"]["dinov2S"]["files"][0]["sha256"]
    )
    # a cache copied elsewhere (a cluster staged without internet) verifies as it is
    staged = tmp_path / "staged"
    shutil.copytree(cache, staged)
    with hub_environment(staged, offline=True):
        build_backbone(SPEC)
    # changed bytes under the same name stop the run, naming the file and the fix
    weights = next(cache.rglob("model.safetensors"))
    save_file({"cls_token": torch.zeros(1, 1, 32)}, str(weights))
    with (
        hub_environment(cache, offline=True),
        pytest.raises(WeightsError, match="differs from what fetch_weights") as e,
    ):
        build_backbone(SPEC)
    assert str(weights) in str(e.value) and "rerun fetch_weights" in str(e.value)


def test_a_file_the_manifest_does_not_list_is_refused(cache):
    fetch_weights(SPEC, cache, "dinov2S")
    manifest = json.loads(manifest_path(cache).read_text())
    del manifest["backbones"]["dinov2S"]
    manifest_path(cache).write_text(json.dumps(manifest))
    with hub_environment(cache, offline=True), pytest.raises(WeightsError, match="not in the weights manifest"):
        build_backbone(SPEC)


def test_random_weights_cite_no_manifest(cache):
    fetch_weights(SPEC, cache, "dinov2S")
    with hub_environment(cache, offline=True):
        assert manifest_citation("random-init:vit:seed=0") is None
        assert manifest_citation({"lucchi": f"timm:x|hf:{REPO_ID}@{COMMIT}/model.safetensors"})["backbone"] == "dinov2S"
