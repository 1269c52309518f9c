"""Helpers for the data tests: tiny synthetic datasets written as IDX files."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import torch
from testlib import free_port

from mnist_flow.data import datasets as data
from mnist_flow.data.idx import encode_idx


def tiny_arrays(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random dataset with every class present in both splits."""
    g = torch.Generator().manual_seed(seed)
    return {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.arange(n_train) % 10,
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.arange(n_test) % 10,
    }


def write_dataset(folder: Path, arrays: dict[str, torch.Tensor], *, gz: bool) -> dict[str, Path]:
    """Write the four standard IDX files into ``folder``; return field -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, base in data.FILES.items():
        path = folder / (f"{base}.gz" if gz else base)
        data.write_idx(path, arrays[name])
        paths[name] = path
    return paths


def gz_files(arrays: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Standard file name (.gz) -> deterministic gzip bytes."""
    return {
        f"{base}.gz": gzip.compress(encode_idx(arrays[name]), mtime=0) for name, base in data.FILES.items()
    }


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


@dataclass
class Mirror:
    """A loopback HTTP server: /good/ serves the files, /wrong/ serves other bytes, /missing/ gives 404."""

    url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)

    def good(self) -> str:
        return f"{self.url}/good/"


# --- other layouts of the same content ---------------------------------------------------------------------------


def raw_contents(folder: Path) -> dict[str, bytes]:
    """field -> the uncompressed IDX bytes of the standard layout in ``folder`` (``NAME.gz`` or ``NAME``)."""
    out = {}
    for name, base in data.FILES.items():
        gz = folder / f"{base}.gz"
        out[name] = gzip.decompress(gz.read_bytes()) if gz.exists() else (folder / base).read_bytes()
    return out


def write_regzipped(folder: Path, contents: dict[str, bytes], *, level: int = 1) -> None:
    """The same content in new gzip containers (another level, an mtime and the file name in the header)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, base in data.FILES.items():
        with open(folder / f"{base}.gz", "wb") as raw, \
                gzip.GzipFile(filename=base, mode="wb", fileobj=raw, compresslevel=level, mtime=1_700_000_000) as gz:
            gz.write(contents[name])


def write_dot_names(folder: Path, contents: dict[str, bytes], *, gz: bool) -> None:
    """The same content as ``train-images.idx3-ubyte`` etc. (the dot names), gzipped or not."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.FILES:
        path = folder / (data.ALT_NAMES[name] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(contents[name], compresslevel=1, mtime=0) if gz else contents[name])


def write_npz(path: Path, contents: dict[str, bytes], *, compressed: bool, label_dtype: str = "uint8",
              fortran: bool = False) -> None:
    """The same content as Keras' mnist.npz (x_train, y_train, x_test, y_test)."""
    import numpy as np

    arrays = {}
    for name, key in data.NPZ_KEYS.items():
        raw = contents[name]
        ndim = raw[3]
        dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
        if name.endswith("labels"):
            array = array.astype(label_dtype)
        arrays[key] = np.asfortranarray(array) if fortran else array
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


# --- a mirror that never stops -----------------------------------------------------------------------------------


@dataclass
class Endless:
    """A loopback HTTP server whose every answer is ``prefix`` then endless filler (optionally a false length)."""

    url: str
    sent: list[int] = field(default_factory=list)


def endless_server(prefix: bytes, filler: bytes, content_length: int | None = None):
    """Context manager: serve ``prefix`` + ``filler`` repeated until the client hangs up."""
    import contextlib
    import http.server
    import threading

    @contextlib.contextmanager
    def serve():
        state = Endless(url="")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no length needed: the body ends when the connection closes

            def do_GET(self) -> None:
                self.send_response(200)
                if content_length is not None:
                    self.send_header("Content-Length", str(content_length))
                self.end_headers()
                sent = 0
                try:
                    self.wfile.write(prefix)
                    sent += len(prefix)
                    while filler and sent < 1 << 31:  # 2 GiB at most, so a broken client cannot hang the test forever
                        self.wfile.write(filler)
                        sent += len(filler)
                except OSError:
                    pass
                state.sent.append(sent)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        state.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield state
        finally:
            server.shutdown()
            server.server_close()

    return serve()
