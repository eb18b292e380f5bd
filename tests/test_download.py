"""download(): file://, plain paths and a local HTTP server; checksums, retries, clean failures."""

from __future__ import annotations

import hashlib
import logging
import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from em_foundation.data.download import ChecksumMismatchError, DownloadError, download

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = dict(retries=2, backoff=0.001)  # no real waiting in tests
WRONG_SHA = "0" * 64


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    """A few MiB of bytes (several chunks) standing in for an archive, with its sha256."""
    source = tmp_path / "mirror" / "data.zip"
    source.parent.mkdir()
    payload = os.urandom(3 * (1 << 20) + 12345)
    source.write_bytes(payload)
    return source, hashlib.sha256(payload).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_file_url_is_copied_and_verified(archive, tmp_path):
    source, sha = archive
    dest = tmp_path / "downloads" / "data.zip"
    assert download(source.as_uri(), sha, dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert leftovers(dest.parent) == ["data.zip"]


def test_plain_local_path_is_accepted(archive, tmp_path):
    source, sha = archive
    dest = tmp_path / "downloads" / "data.zip"
    download(str(source), sha.upper(), dest)  # checksums compare case-insensitively
    assert dest.read_bytes() == source.read_bytes()


def test_http_download_is_verified(archive, tmp_path, http_server):
    source, sha = archive
    server = http_server(source.parent)
    dest = tmp_path / "downloads" / "data.zip"
    download(server.url("data.zip"), sha, dest, **FAST)
    assert dest.read_bytes() == source.read_bytes()
    assert server.requests == ["/data.zip"]
    assert leftovers(dest.parent) == ["data.zip"]


def test_wrong_checksum_names_both_sums_and_leaves_nothing(archive, tmp_path):
    source, sha = archive
    dest = tmp_path / "downloads" / "data.zip"
    with pytest.raises(ChecksumMismatchError) as caught:
        download(source.as_uri(), WRONG_SHA, dest, config_keys="datasets.vnc.url / .sha256")
    message = str(caught.value)
    assert WRONG_SHA in message and sha in message and str(dest) in message
    assert "datasets.vnc.url / .sha256" in message
    assert leftovers(dest.parent) == []


def test_wrong_checksum_over_http_is_not_retried(archive, tmp_path, http_server):
    source, _ = archive
    server = http_server(source.parent)
    dest = tmp_path / "downloads" / "data.zip"
    with pytest.raises(ChecksumMismatchError):
        download(server.url("data.zip"), WRONG_SHA, dest, **FAST)
    assert len(server.requests) == 1
    assert leftovers(dest.parent) == []


def test_unreachable_url_fails_clearly_after_retries(tmp_path, closed_port, caplog):
    url = f"http://127.0.0.1:{closed_port}/x.zip"
    dest = tmp_path / "downloads" / "x.zip"
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError) as caught:
        download(url, WRONG_SHA, dest, retries=1, backoff=0.001, config_keys="datasets.vnc.url / .sha256")
    message = str(caught.value)
    assert url in message and WRONG_SHA in message and "datasets.vnc.url / .sha256" in message
    assert "2 tries failed" in message and "local copy" in message
    assert "try 1/2" in caplog.text  # the retry was announced
    assert leftovers(dest.parent) == []


def test_503_is_retried_then_succeeds(archive, tmp_path, http_server):
    source, sha = archive
    server = http_server(source.parent, fail_first=1, fail_status=503)
    dest = tmp_path / "downloads" / "data.zip"
    download(server.url("data.zip"), sha, dest, **FAST)
    assert len(server.requests) == 2
    assert dest.read_bytes() == source.read_bytes()
    assert leftovers(dest.parent) == ["data.zip"]


def test_persistent_5xx_gives_up_after_the_configured_retries(archive, tmp_path, http_server):
    source, sha = archive
    server = http_server(source.parent, fail_first=100, fail_status=502)
    dest = tmp_path / "downloads" / "data.zip"
    with pytest.raises(DownloadError, match="3 tries failed.*502"):
        download(server.url("data.zip"), sha, dest, retries=2, backoff=0.001)
    assert len(server.requests) == 3
    assert leftovers(dest.parent) == []


def test_4xx_is_not_retried(archive, tmp_path, http_server):
    source, sha = archive
    server = http_server(source.parent)
    dest = tmp_path / "downloads" / "missing.zip"
    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        download(server.url("missing.zip"), sha, dest, **FAST)
    assert server.url("missing.zip") in str(caught.value)
    assert len(server.requests) == 1
    assert leftovers(dest.parent) == []


def test_connection_dropped_mid_body_is_retried(archive, tmp_path, http_server):
    source, sha = archive
    server = http_server(source.parent, truncate_first=1)
    dest = tmp_path / "downloads" / "data.zip"
    download(server.url("data.zip"), sha, dest, **FAST)
    assert len(server.requests) == 2
    assert dest.read_bytes() == source.read_bytes()


def test_missing_sha256_logs_the_computed_sum_as_unverified(archive, tmp_path, caplog):
    source, sha = archive
    dest = tmp_path / "downloads" / "data.zip"
    with caplog.at_level(logging.WARNING, logger="em_foundation.data.download"):
        download(source.as_uri(), None, dest)
    assert dest.is_file()
    assert "UNVERIFIED" in caplog.text and sha in caplog.text


def test_missing_local_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "vnc.zip"
    dest = tmp_path / "downloads" / "vnc.zip"
    with pytest.raises(DownloadError, match="cannot read the local file") as caught:
        download(missing.as_uri(), WRONG_SHA, dest)
    assert str(missing) in str(caught.value)
    assert leftovers(dest.parent) == []


def test_unsupported_scheme_and_empty_url_are_rejected(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        download("ftp://example.org/x.zip", None, tmp_path / "x.zip")
    with pytest.raises(DownloadError, match="no URL configured.*datasets.<name>.url"):
        download("", None, tmp_path / "x.zip")


def test_snakemake_script_downloads_and_logs(archive, tmp_path):
    source, sha = archive
    dest = tmp_path / "resources" / "downloads" / "vnc.zip"
    log_file = tmp_path / "logs" / "download_vnc.log"
    log_file.parent.mkdir()
    fake = SimpleNamespace(
        params=SimpleNamespace(url=source.as_uri(), sha256=sha),
        output=[str(dest)],
        log=[str(log_file)],
        wildcards=SimpleNamespace(dataset="vnc"),
    )
    script = REPO_ROOT / "scripts" / "download_dataset.py"
    runpy.run_path(str(script), init_globals={"snakemake": fake})
    assert dest.read_bytes() == source.read_bytes()
    assert "data.zip" in log_file.read_text()  # the progress bar went to the log
    assert len(script.read_text().splitlines()) < 25


def test_real_vnc_archive_checksum_from_readme(shared_data, tmp_path):
    """The local copy of the real VNC archive verifies against the checksum in its README."""
    source = shared_data("groundtruth-drosophila-vnc-master.zip")
    dest = tmp_path / "downloads" / "vnc.zip"
    download(source.as_uri(), "6763f2a91af1fc21f334dbe0ed88fe50bed5aec546426f2f8a3762667a9ad309", dest)
    assert dest.stat().st_size == source.stat().st_size


def test_unverified_download_warning_reaches_the_console_not_only_the_log(archive, tmp_path):
    from tests.workflow import demo_config, snakemake, write_config

    source, sha = archive
    config = demo_config()
    config["datasets"]["lucchi"] = {"converter": "lucchi_pp", "url": source.as_uri(), "sha256": None}
    configfile = write_config(tmp_path / "config.yaml", config)
    result = snakemake(tmp_path / "work", "resources/downloads/lucchi.zip", configfile=configfile)
    console = result.stdout + result.stderr
    print(console[-1500:])
    assert f"WARNING: UNVERIFIED download: no sha256 configured for {source.as_uri()}. Its sha256 is {sha}" in console
    assert "datasets.lucchi.url / datasets.lucchi.sha256" in console
    assert "UNVERIFIED" in (tmp_path / "work/results/logs/download_dataset/lucchi.log").read_text()
