"""Where pretrained weights live and how they are fetched (checkpoint files: ``checkpoint``).

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

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from em_foundation.backbones.checkpoint import WeightsError, require_file
from em_foundation.families import HUB_FAMILIES, family_of
from em_foundation.io import file_sha256

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
    cache_root: Path | None = None  # hub.cache_dir (set by hub_environment): where the manifest lives


def hub_settings() -> HubSettings:
    """The cache and offline mode in force now (set by ``hub_environment``), read at call time."""
    env = os.environ
    hub_cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None)
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return HubSettings(
        hub_cache=Path(hub_cache) if hub_cache else None,
        offline=offline,
        torch_home=Path(env["TORCH_HOME"]) if env.get("TORCH_HOME") else None,
        cache_root=Path(env["HF_HOME"]).parent if env.get("HF_HOME") else None,
    )


# ----------------------------------------------------------------------------- hub sources


@dataclass(frozen=True)
class HubSource:
    """Where a family's pretrained checkpoint is published."""

    repo_id: str | None  # Hugging Face repository
    filenames: tuple[str, ...] = ()  # candidates, preferred first
    url: str | None = None  # plain URL (older open_clip tags without a hub repository)
    label: str = ""  # model (and tag) the source belongs to, for messages
    # "xxh128:<hex>" or "sha256:<hex>" as the publisher lists it (micro-sam's registry): a URL
    # source with a checksum is fetched by ``fetch_checked_url`` and verified on every read
    checksum: str | None = None
    # the publisher's pinned revision (timm's "repo@revision", smp's settings); a config
    # entry's own ``revision`` wins
    revision: str | None = None


def hub_source(spec: dict[str, Any]) -> HubSource:
    """The published checkpoint of a config entry with ``weights: pretrained``."""
    from em_foundation.backbones import load

    family = family_of(spec["family"])
    if family.hub is None:
        raise WeightsError(f"family {family.name!r} has no pretrained weights to fetch")
    return load(family.hub)(spec)


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
        checksum = f"#{self.source.checksum}" if self.source.checksum else ""
        return f"url:{self.source.url}{checksum}"


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
    revision = spec.get("revision") or source.revision
    where = settings.hub_cache or "the default Hugging Face cache"
    if source.repo_id is None:
        return _resolve_url(spec, source, settings)
    from huggingface_hub import hf_hub_download

    errors = []
    gated = False
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
            gated = gated or is_gated(error)
            errors.append(f"{filename}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        resolved = ResolvedFile(Path(path), source, filename, revision, snapshot_commit(Path(path)))
        if settings.offline:
            verify_against_manifest(resolved, settings)
        return resolved
    if settings.offline:
        raise WeightsError(
            f"pretrained weights of {source.label} ({source.repo_id}@{revision or 'main'}, one of "
            f"{list(source.filenames)}) are not in the weights cache {where}; run the fetch_weights rule "
            f"on a machine with internet first (snakemake --until fetch_weights). Tried: {errors}"
        )
    if gated:
        raise WeightsError(
            f"the Hugging Face repository {source.repo_id} (pretrained weights of {source.label}) is gated: accept "
            f"its licence on its page, https://huggingface.co/{source.repo_id}, with your Hugging Face account, "
            "then set HF_TOKEN to a token of that account in the environment of the login node that runs "
            f"fetch_weights (hub_environment moves HF_HOME, so a saved `huggingface-cli login` is not seen). Tried: {errors}"
        )
    raise WeightsError(
        f"could not download the pretrained weights of {source.label} from {source.repo_id}@{revision or 'main'} "
        f"(tried {errors}); gated repositories need a token in the HF_TOKEN environment variable "
        "(hub_environment moves HF_HOME, so a token saved by `huggingface-cli login` is not seen)"
    )


def is_gated(error: BaseException) -> bool:
    """A refusal for want of an accepted licence or a token (huggingface_hub's GatedRepoError, HTTP 401/403)."""
    from huggingface_hub.errors import GatedRepoError

    if isinstance(error, GatedRepoError):
        return True
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) in (401, 403)


def _resolve_url(spec: dict[str, Any], source: HubSource, settings: HubSettings) -> ResolvedFile:
    if spec.get("revision"):
        raise WeightsError(
            f"{source.label} is published at a plain URL ({source.url}), which has no revisions; remove `revision`"
        )
    if source.checksum:
        return _resolve_checked_url(source, settings)
    cache = (settings.torch_home or Path.home() / ".cache") / "open_clip"
    target = cache / os.path.basename(source.url or "")
    if settings.offline:
        require_file(target)
        path = target
    else:
        from open_clip.pretrained import download_pretrained_from_url

        path = Path(download_pretrained_from_url(source.url, cache_dir=str(cache)))
    resolved = ResolvedFile(path, source, path.name, None, None)
    if settings.offline:
        verify_against_manifest(resolved, settings)
    return resolved


def file_checksum(path: Path, algorithm: str) -> str:
    """Hex digest of a file with ``xxh128`` (micro-sam's, pooch's) or ``sha256``."""
    if algorithm == "xxh128":
        import xxhash

        digest: Any = xxhash.xxh128()
    elif algorithm == "sha256":
        import hashlib

        digest = hashlib.sha256()
    else:
        raise WeightsError(f"checksum algorithm {algorithm!r} is not xxh128 or sha256")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, checksum: str, url: str | None = None) -> None:
    """``checksum`` ("algorithm:hex") of ``path``, or a WeightsError naming both digests."""
    algorithm, _, expected = checksum.partition(":")
    actual = file_checksum(path, algorithm)
    if actual != expected.lower():
        raise WeightsError(
            f"checksum mismatch for {path}{f' (from {url})' if url else ''}: expected {checksum}, got "
            f"{algorithm}:{actual}; delete the file and run fetch_weights again"
        )


def fetch_checked_url(url: str, checksum: str, target: Path) -> Path:
    """Download ``url`` to ``target``, keeping it only if it has the published ``checksum``.

    The bytes land under a temporary name (em_foundation.data.download: retries, file://
    and plain paths for mirrors) and are renamed only after the check, so a changed or
    truncated upstream file never sits in the cache.
    """
    import logging

    from em_foundation.data.download import DownloadError, download

    partial = target.with_name(target.name + ".unverified")
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("em_foundation.data.download")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "no sha256 configured" warning: the checksum is checked below
    try:
        download(url, None, partial, config_keys="the checksum table of the backbone's builder module")
    except DownloadError as error:
        raise WeightsError(str(error)) from None
    finally:
        quiet.setLevel(level)
    try:
        verify_checksum(partial, checksum, url)
    except WeightsError:
        partial.unlink()
        raise
    partial.replace(target)
    return target


def _resolve_checked_url(source: HubSource, settings: HubSettings) -> ResolvedFile:
    """A file published at a URL with a checksum: fetched once online, read (and verified) offline."""
    from urllib.parse import urlsplit

    name = os.path.basename(urlsplit(source.url or "").path) or "weights.pt"
    target = (settings.torch_home or Path.home() / ".cache") / "checkpoints" / source.label / name
    checksum = str(source.checksum)
    if not target.is_file():
        if settings.offline:
            raise WeightsError(
                f"pretrained weights of {source.label} ({source.url}) are not in the weights cache ({target}); "
                "run the fetch_weights rule on a machine with internet first (snakemake --until fetch_weights), "
                "or copy the file there"
            )
        fetch_checked_url(str(source.url), checksum, target)
    verify_checksum(target, checksum, source.url)
    resolved = ResolvedFile(target, source, name, None, None)
    if settings.offline:
        verify_against_manifest(resolved, settings)
    return resolved


# ----------------------------------------------------------------------------- fetch rule


def fetch_weights(spec: dict[str, Any], cache_dir: str | os.PathLike, backbone: str | None = None) -> dict[str, Any]:
    """Download a backbone's pretrained weights into ``cache_dir``; return the marker record.

    With ``backbone`` (the config key), what was fetched is also entered in the cache's
    manifest (``manifest.json`` beside it): repository, revision, files with size and sha256,
    and the licence the hub gives.

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
        checksum=resolved.source.checksum,
        revision=resolved.revision,  # asked of the hub: the config's, else the publisher's pin (None: main)
        revision_resolved=resolved.commit,
        identity=resolved.identity,
        files=[_file_record(resolved.path, name=resolved.filename)],
        licence=hub_licence(resolved.source.repo_id, resolved.commit or resolved.revision),
    )
    if backbone is not None:
        record["manifest"] = str(record_in_manifest(cache_dir, backbone, record))
    return record


def _file_record(path: Path, name: str | None = None) -> dict[str, Any]:
    path = Path(path)
    return {
        "name": name or path.name,
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


# ----------------------------------------------------------------------------- manifest

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def manifest_path(cache_dir: str | os.PathLike) -> Path:
    """The manifest of a weights cache: beside it, so copying the cache directory copies it too."""
    return Path(cache_dir).resolve() / MANIFEST_NAME


def hub_licence(repo_id: str | None, revision: str | None) -> str | None:
    """The licence a Hugging Face repository's model card declares (None: none, or no hub reachable)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import model_info

        info = model_info(repo_id, revision=revision, timeout=20)
    except Exception:  # offline, gated, or an old hub: the manifest says "unknown" rather than guess
        return None
    card = getattr(info, "card_data", None) or getattr(info, "cardData", None)
    licence = card.get("license") if card is not None else None
    return str(licence) if licence else None


def read_manifest(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        return {"version": MANIFEST_VERSION, "backbones": {}}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise WeightsError(f"weights manifest {path} is not valid JSON ({error}); delete it and rerun fetch_weights")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("backbones"), dict):
        raise WeightsError(f"weights manifest {path} has no 'backbones' table; delete it and rerun fetch_weights")
    return manifest


def record_in_manifest(cache_dir: str | os.PathLike, backbone: str, record: dict[str, Any]) -> Path:
    """Enter (or replace) ``backbone``'s fetched files in the manifest, atomically and under a lock.

    fetch_weights jobs of several backbones run at once on the login node: the lock keeps one
    job's entry from being lost to another's read-modify-write; the rename keeps a reader (or
    a killed job) from ever seeing half a manifest.
    """
    import fcntl

    from em_foundation.io import write_json

    path = manifest_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent
    entry = {
        "source": record["source"],
        "repository": record.get("repo_id"),
        "url": record.get("url"),
        "revision": record.get("revision"),
        "commit": record.get("revision_resolved"),
        "identity": record.get("identity"),
        "licence": record.get("licence"),
        "checksum": record.get("checksum"),
        "files": [
            {
                "name": f["name"],
                # relative to the cache, so a copied cache (a cluster staged offline) still verifies
                "path": os.path.relpath(f["path"], root) if Path(f["path"]).is_relative_to(root) else f["path"],
                "bytes": f["bytes"],
                "sha256": f["sha256"],
            }
            for f in record["files"]
        ],
    }
    with open(path.with_name(MANIFEST_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(path)
        manifest["backbones"][backbone] = entry
        write_json(path, manifest)
    return path


def manifest_entry(identity: str, cache_root: Path | None) -> tuple[Path, str, dict[str, Any]] | None:
    """(manifest, backbone, entry) of the fetched weights whose identity ``identity`` contains."""
    if cache_root is None:
        return None
    path = manifest_path(cache_root)
    if not path.is_file():
        return None
    for backbone, entry in sorted(read_manifest(path)["backbones"].items()):
        if entry.get("identity") and entry["identity"] in identity:
            return path, backbone, entry
    return None


def verify_against_manifest(resolved: ResolvedFile, settings: HubSettings) -> None:
    """A compute rule's weights file against the manifest fetch_weights wrote: size and sha256.

    A cache without a manifest (filled before manifests existed, or by hand) is read as it is;
    with one, a file it does not list or whose bytes changed stops the run.
    """
    if settings.cache_root is None or not manifest_path(settings.cache_root).is_file():
        return
    found = manifest_entry(resolved.identity, settings.cache_root)
    path = manifest_path(settings.cache_root)
    if found is None:
        raise WeightsError(
            f"weights {resolved.identity} ({resolved.path}) are not in the weights manifest {path}; run the "
            "fetch_weights rule for this backbone (snakemake --until fetch_weights), or copy the cache together "
            "with the manifest that lists it"
        )
    _, backbone, entry = found
    listed = next((f for f in entry["files"] if f["name"] == resolved.filename), None)
    actual_bytes = resolved.path.stat().st_size
    if listed is None or listed["bytes"] != actual_bytes or listed["sha256"] != file_sha256(resolved.path):
        raise WeightsError(
            f"weights file {resolved.path} differs from what fetch_weights recorded for {backbone!r} in {path} "
            f"(listed: {listed}; now {actual_bytes} bytes); delete the file and rerun fetch_weights"
        )


def citation_text(citation: dict[str, Any] | None) -> str:
    """A run's manifest citation in one line for the tables and the report ('' without one):
    the backbone's manifest entry, its identity and the sha256 of each file it read."""
    if not citation:
        return ""
    files = ", ".join(f"{f['name']} sha256:{f['sha256']}" for f in citation.get("files", []))
    return f"{citation['identity']} ({files}; {citation['manifest']} entry {citation['backbone']})"


def manifest_citation(identity: Any) -> dict[str, Any] | None:
    """The manifest entry a run's weights came from, for run.json (None: random or file weights, no manifest)."""
    identities = identity.values() if isinstance(identity, dict) else [identity]
    settings = hub_settings()
    for value in identities:
        found = manifest_entry(str(value), settings.cache_root) if value else None
        if found is not None:
            path, backbone, entry = found
            return {
                "manifest": str(path),
                "backbone": backbone,
                "identity": entry["identity"],
                "licence": entry.get("licence"),
                "files": [{"name": f["name"], "sha256": f["sha256"]} for f in entry["files"]],
            }
    return None
