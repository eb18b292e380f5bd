"""Shared test fixtures: where the real EM data live, and a throw-away local HTTP server.

Tests never touch the internet: downloads are exercised from file:// URLs and from an HTTP
server on 127.0.0.1 that a test starts and that is stopped when the test ends.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real archives kept outside the repository (never committed); see ../shared/data/README.md.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    """Return a getter for a file under ../shared/data that skips the test, saying why, if absent."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            reason = f"real data file {path} is absent (only the project's machines have ../shared/data)"
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        return path

    return get


class LocalHTTPServer:
    """Serves one directory on 127.0.0.1, records request paths, and can misbehave on purpose.

    ``fail_first`` requests get ``fail_status``; the next ``truncate_first`` requests get
    half the body under the full Content-Length, as a dropped connection would.
    """

    def __init__(self, directory: Path, fail_first: int = 0, fail_status: int = 503, truncate_first: int = 0) -> None:
        self.requests: list[str] = []
        self.fail_left, self.fail_status, self.truncate_left = fail_first, fail_status, truncate_first
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                if server.fail_left > 0:
                    server.fail_left -= 1
                    self.send_error(server.fail_status)
                elif server.truncate_left > 0:
                    server.truncate_left -= 1
                    body = Path(self.translate_path(self.path)).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[Callable[..., LocalHTTPServer]]:
    """Start local servers with ``http_server(directory, **behaviour)``; all stop after the test."""
    started: list[LocalHTTPServer] = []

    def start(directory: Path, **behaviour: int) -> LocalHTTPServer:
        started.append(LocalHTTPServer(Path(directory), **behaviour))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
