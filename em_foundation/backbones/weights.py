"""Where pretrained weights live, how they are fetched, and how a weights file is checked.

Two places use this module:

* ``fetch_weights`` (the ``fetch_weights`` rule, on the login node, online) downloads the
  configured backbone's checkpoint into ``hub.cache_dir`` pinned to ``revision`` and returns
  the marker record (repository, resolved commit, files and their sha256).
* The backbones (compute rules, inside ``hub_environment(cache_dir, offline=True)``) resolve
  the same file from that cache without touching the network, and put its commit into
  ``backbone.identity``.

Caveat this module is written around: ``huggingface_hub`` reads ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is first imported (timm imports it
at its own import). Setting the environment afterwards changes nothing inside the library,
so every hub call here passes ``cache_dir`` and ``local_files_only`` explicitly, read from
the environment at call time by ``hub_settings``. ``hub_environment`` still sets the
variables, for anything that reads them late (torch hub, child processes).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

# Families whose pretrained weights come from the Hugging Face hub.
HUB_FAMILIES = ("dinov2", "dinov3", "openclip")


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message names the file and the fix."""


# ----------------------------------------------------------------------------- cache location


@contextmanager
def hub_environment(cache_dir: str | os.PathLike, offline: bool = True) -> Iterator[Path]:
    """Point Hugging Face and torch hub caches at ``cache_dir`` for the duration.

    ``offline=True`` is for compute rules: they must only read what ``fetch_weights``
    put there on the login node, never reach the internet.
    """
    cache = Path(cache_dir).resolve()
    overrides = {
        "HF_HOME": str(cache / "huggingface"),
        # A user's global HF_HUB_CACHE would otherwise win over HF_HOME.
        "HF_HUB_CACHE": str(cache / "huggingface" / "hub"),
        "TORCH_HOME": str(cache / "torch"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "TRANSFORMERS_OFFLINE": "1" if offline else "0",
    }
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield cache
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class HubSettings:
    hub_cache: Path | None  # None: huggingface_hub's own default
    offline: bool
    torch_home: Path | None


def hub_settings() -> HubSettings:
    """The cache and offline mode in force now (set by ``hub_environment``), read at call time."""
    env = os.environ
    hub_cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None)
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return HubSettings(
        hub_cache=Path(hub_cache) if hub_cache else None,
        offline=offline,
        torch_home=Path(env["TORCH_HOME"]) if env.get("TORCH_HOME") else None,
    )


# ----------------------------------------------------------------------------- files


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; set backbones.<name>.weights to an existing "
            "checkpoint, to 'pretrained' to fetch the hub weights, or to 'random'"
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``.safetensors`` or a torch file, ``state_dict``/``model`` unwrapped)."""
    require_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, truncated, or a pickle that is not a state dict
        # PyTorch's own text advises weights_only=False (unsafe, and no cure for a damaged file): keep its first sentence.
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"weights file {path} is not a checkpoint file ({reason}); replace it with the model's weights "
            "(torch.save or .safetensors), or set backbones.<name>.weights to 'pretrained' or 'random'"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint and name the first mismatched keys if it does not fit the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys (first 5 of {len(missing)}): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys (first 5 of {len(unexpected)}): {unexpected[:5]}")
        if wrong_shape:
            parts.append(f"shape mismatches (first 5 of {len(wrong_shape)}): {wrong_shape[:5]}")
        raise WeightsError(
            f"weights file {path} does not fit the architecture {type(model).__name__}: "
            + "; ".join(parts)
            + ". Check that backbones.<name>.model (and model_kwargs) name the architecture the file was saved from."
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- hub sources


@dataclass(frozen=True)
class HubSource:
    """Where a family's pretrained checkpoint is published."""

    repo_id: str | None  # Hugging Face repository
    filenames: tuple[str, ...] = ()  # candidates, preferred first
    url: str | None = None  # plain URL (older open_clip tags without a hub repository)
    label: str = ""  # model (and tag) the source belongs to, for messages


def hub_source(spec: dict[str, Any]) -> HubSource:
    """The published checkpoint of a config entry with ``weights: pretrained``."""
    family = spec["family"]
    if family in ("dinov2", "dinov3"):
        from em_foundation.backbones.timm_vit import timm_hub_source

        return timm_hub_source(spec)
    if family == "openclip":
        from em_foundation.backbones.openclip import openclip_hub_source

        return openclip_hub_source(spec)
    raise WeightsError(f"family {family!r} has no pretrained weights to fetch")


@dataclass(frozen=True)
class ResolvedFile:
    path: Path
    source: HubSource
    filename: str
    revision: str | None  # as requested
    commit: str | None  # as resolved (the snapshot the cache holds)

    @property
    def identity(self) -> str:
        if self.source.repo_id:
            return f"hf:{self.source.repo_id}@{self.commit or self.revision or 'unknown'}/{self.filename}"
        return f"url:{self.source.url}"


def snapshot_commit(path: Path) -> str | None:
    """The commit of a file in a Hugging Face cache (``.../snapshots/<commit>/<file>``)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def resolve_pretrained(spec: dict[str, Any], source: HubSource | None = None) -> ResolvedFile:
    """Find (offline) or download (online) the pretrained checkpoint of ``spec``.

    Offline (compute rules) nothing is downloaded: a file missing from the cache raises a
    WeightsError that says to run the ``fetch_weights`` rule.
    """
    source = source or hub_source(spec)
    settings = hub_settings()
    revision = spec.get("revision")
    where = settings.hub_cache or "the default Hugging Face cache"
    if source.repo_id is None:
        return _resolve_url(spec, source, settings)
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in source.filenames:
        try:
            path = hf_hub_download(
                repo_id=source.repo_id,
                filename=filename,
                revision=revision,
                cache_dir=str(settings.hub_cache) if settings.hub_cache else None,
                local_files_only=settings.offline,
            )
        except Exception as error:  # not in the cache, not in the repository, gated, no network
            errors.append(f"{filename}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        return ResolvedFile(Path(path), source, filename, revision, snapshot_commit(Path(path)))
    if settings.offline:
        raise WeightsError(
            f"pretrained weights of {source.label} ({source.repo_id}@{revision or 'main'}, one of "
            f"{list(source.filenames)}) are not in the weights cache {where}; run the fetch_weights rule "
            f"on a machine with internet first (snakemake --until fetch_weights). Tried: {errors}"
        )
    raise WeightsError(
        f"could not download the pretrained weights of {source.label} from {source.repo_id}@{revision or 'main'} "
        f"(tried {errors}); gated repositories need a token in the HF_TOKEN environment variable "
        "(hub_environment moves HF_HOME, so a token saved by `huggingface-cli login` is not seen)"
    )


def _resolve_url(spec: dict[str, Any], source: HubSource, settings: HubSettings) -> ResolvedFile:
    if spec.get("revision"):
        raise WeightsError(
            f"{source.label} is published at a plain URL ({source.url}), which has no revisions; remove `revision`"
        )
    cache = (settings.torch_home or Path.home() / ".cache") / "open_clip"
    target = cache / os.path.basename(source.url or "")
    if settings.offline:
        require_file(target)
        path = target
    else:
        from open_clip.pretrained import download_pretrained_from_url

        path = Path(download_pretrained_from_url(source.url, cache_dir=str(cache)))
    return ResolvedFile(path, source, path.name, None, None)


# ----------------------------------------------------------------------------- fetch rule


def fetch_weights(spec: dict[str, Any], cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Download a backbone's pretrained weights into ``cache_dir``; return the marker record.

    ``weights: random`` and ``weights: <file>`` download nothing: the record says so (a
    local file is checked to exist and hashed, so a wrong path fails here, on the login
    node, and not hours later on a compute node).
    """
    weights = spec.get("weights") or "pretrained"
    record: dict[str, Any] = {
        "family": spec["family"],
        "model": spec.get("model"),
        "weights": weights,
        "revision_requested": spec.get("revision"),
        "files": [],
    }
    if spec["family"] not in HUB_FAMILIES:
        record["source"] = "none"
        record["note"] = f"family {spec['family']!r} has no weights"
        return record
    if weights == "random":
        record["source"] = "random"
        record["init_seed"] = int((spec.get("options") or {}).get("init_seed", 0))
        return record
    if weights != "pretrained":
        path = require_file(Path(weights))
        record["source"] = "file"
        record["files"] = [_file_record(path)]
        return record
    with hub_environment(cache_dir, offline=False):
        resolved = resolve_pretrained(spec)
    record.update(
        source="hub" if resolved.source.repo_id else "url",
        repo_id=resolved.source.repo_id,
        url=resolved.source.url,
        revision_resolved=resolved.commit,
        identity=resolved.identity,
        files=[_file_record(resolved.path, name=resolved.filename)],
    )
    return record


def _file_record(path: Path, name: str | None = None) -> dict[str, Any]:
    path = Path(path)
    return {
        "name": name or path.name,
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }
