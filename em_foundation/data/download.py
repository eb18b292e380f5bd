"""Fetch a dataset archive and verify its sha256, leaving either the whole file or nothing.

Sources are https://, http://, file:// or a plain path (a mirror on a cluster file
system, for machines that cannot reach the hosts). The bytes are streamed to a temporary
file beside the destination, hashed on the way, and renamed only once the checksum
matches, so a killed job, a dropped connection or a changed upstream file never leaves
something Snakemake would take for a finished download. Transient network failures are
retried with exponential back-off; errors that another try cannot fix (HTTP 4xx, a
checksum mismatch, a missing local file) fail at once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import sys
import time
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, url2pathname, urlopen

from tqdm import tqdm

from em_foundation.io import atomic_path

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = "em-foundation-download/1.0 (+urllib)"
# HTTP statuses worth another try: server-side trouble, rate limits, request timeouts.
_RETRY_STATUSES = frozenset({408, 429})


class DownloadError(RuntimeError):
    """The archive could not be fetched; the message says where to point at a local copy."""


class ChecksumMismatchError(DownloadError):
    """The fetched bytes are not the configured ones; the file was removed."""

    def __init__(self, message: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected, self.actual = expected, actual


class _ShortRead(OSError):
    """The server closed the connection before sending Content-Length bytes."""


_TRANSIENT = (URLError, TimeoutError, ConnectionError, http.client.HTTPException, _ShortRead)


def download(
    url: str,
    sha256: Optional[str],
    dest: Path,
    retries: int = 4,
    backoff: float = 1.0,
    config_keys: str = "datasets.<name>.url / .sha256",
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` and verify it against ``sha256`` (None: compute, log, warn).

    ``retries`` is the number of further tries after the first on a transient network
    failure, waiting ``backoff * 2**k`` seconds before try k+2. ``config_keys`` names the
    config entries the user should edit, and appears in every error message.
    """
    dest = Path(dest)
    expected = sha256.strip().lower() if sha256 else None
    if not url:
        raise DownloadError(f"no URL configured for {dest.name}; set {config_keys}")
    local = _local_path(url, config_keys)
    with atomic_path(dest, suffix=".part") as tmp:
        if local is not None:
            actual = _copy_local(local, tmp, url, expected, config_keys)
        else:
            actual = _fetch_with_retries(url, tmp, expected, retries, backoff, timeout, config_keys)
        _verify(actual, expected, url, dest, config_keys)
    return dest


def _local_path(url: str, config_keys: str) -> Optional[Path]:
    """The file behind a file:// URL or a plain path; None for http(s)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a path, or a Windows drive letter
        return Path(url).expanduser()
    raise DownloadError(
        f"unsupported URL scheme {parts.scheme!r} in {url}; use https://, http://, "
        f"file:// or a local path in {config_keys}"
    )


def _copy_local(path: Path, tmp: Path, url: str, expected: Optional[str], config_keys: str) -> str:
    try:
        with open(path, "rb") as source:
            return _stream(source, tmp, path.stat().st_size, path.name)
    except OSError as err:
        raise DownloadError(_failure(url, expected, config_keys, f"cannot read the local file: {err}")) from None


def _fetch_with_retries(
    url: str, tmp: Path, expected: Optional[str], retries: int, backoff: float, timeout: float, config_keys: str
) -> str:
    attempts = max(retries, 0) + 1
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return _fetch_once(url, tmp, timeout)
        except HTTPError as err:
            if not (err.code >= 500 or err.code in _RETRY_STATUSES):
                raise DownloadError(_failure(url, expected, config_keys, f"HTTP {err.code} {err.reason}")) from None
            last = err
        except _TRANSIENT as err:
            last = err
        if attempt < attempts:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("try %d/%d for %s failed (%s); retrying in %.2f s", attempt, attempts, url, last, delay)
            time.sleep(delay)
    raise DownloadError(_failure(url, expected, config_keys, f"{attempts} tries failed, the last with: {last}"))


def _fetch_once(url: str, tmp: Path, timeout: float) -> str:
    request = Request(url, headers={"User-Agent": USER_AGENT})
    with urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return _stream(response, tmp, total, Path(urlsplit(url).path).name or url)


def _stream(source: BinaryIO, tmp: Path, total: Optional[int], label: str) -> str:
    """Copy ``source`` into ``tmp`` (from its start) in chunks; return the sha256 hex digest."""
    digest = hashlib.sha256()
    written = 0
    interactive = sys.stderr.isatty()
    with (
        open(tmp, "wb") as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            mininterval=0.2 if interactive else 10.0,
            leave=True,
        ) as bar,
    ):
        for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    if total is not None and written != total:
        raise _ShortRead(f"connection closed after {written} of {total} bytes")
    return digest.hexdigest()


def _verify(actual: str, expected: Optional[str], url: str, dest: Path, config_keys: str) -> None:
    if expected is None:
        log.warning(
            "UNVERIFIED download: no sha256 configured for %s. Its sha256 is %s; pin it in %s "
            "so that a changed or corrupt file is caught next time.",
            url,
            actual,
            config_keys,
        )
        return
    if actual != expected:
        raise ChecksumMismatchError(
            f"checksum mismatch for {dest} (from {url}): expected sha256 {expected}, got {actual}. "
            f"The file was removed. Download again if it was corrupted on the way; if the source "
            f"changed on purpose, check it and update {config_keys}.",
            expected,
            actual,
        )
    log.info("sha256 of %s verified: %s", dest.name, actual)


def _failure(url: str, expected: Optional[str], config_keys: str, reason: str) -> str:
    return (
        f"could not download {url}: {reason}. Expected sha256: {expected or 'none configured'}. "
        f"If this machine cannot reach the host, fetch the file elsewhere and point {config_keys} "
        f"at the local copy (a path or a file:// URL) and its sha256."
    )
