"""Fixtures for the data tests: a loopback HTTP mirror serving a tiny dataset."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator

import pytest
from data_helpers import Mirror, dead_port, gz_files, tiny_arrays

from mnist_flow import data


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """Serve a tiny dataset on 127.0.0.1 and make the loader expect its md5s and know no other mirrors."""
    files = gz_files(tiny_arrays())
    state = Mirror(url="", files=files)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append(self.path)
            kind, _, name = self.path.strip("/").partition("/")
            body = files.get(name)
            if kind == "missing" or body is None:
                self.send_error(404)
                return
            if kind == "wrong":
                body = b"not the file" + body[:10]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    md5s = {name: hashlib.md5(body).hexdigest() for name, body in files.items()}
    monkeypatch.setattr(data, "_torchvision_resources", lambda name: dict(md5s))
    # torchvision's real mirrors are replaced by a refused loopback port: the tests never reach the internet.
    monkeypatch.setattr(data, "_torchvision_mirrors", lambda name: [f"http://127.0.0.1:{dead_port()}/tv/"])
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
