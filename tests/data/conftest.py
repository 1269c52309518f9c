"""Fixtures for the data tests: a loopback HTTP mirror serving a tiny dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from data_helpers import Mirror, dead_port, gz_files, tiny_arrays
from testlib import file_server

from mnist_flow.data import datasets as data


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """Serve a tiny dataset on 127.0.0.1 and make the loader expect its md5s and know no other mirrors."""
    files = gz_files(tiny_arrays())
    state = Mirror(url="", files=files)

    def route(path: str) -> bytes | None:
        state.requests.append(path)
        kind, _, name = path.strip("/").partition("/")
        body = files.get(name)
        if kind == "missing" or body is None:
            return None
        return b"not the file" + body[:10] if kind == "wrong" else body

    md5s = {name: hashlib.md5(body).hexdigest() for name, body in files.items()}
    monkeypatch.setattr(data, "_torchvision_resources", lambda name: dict(md5s))
    # torchvision's real mirrors are replaced by a refused loopback port: the tests never reach the internet.
    monkeypatch.setattr(data, "_torchvision_mirrors", lambda name: [f"http://127.0.0.1:{dead_port()}/tv/"])
    with file_server(route) as url:
        state.url = url
        yield state
