"""Helpers for the data tests: tiny synthetic datasets written as IDX files."""

from __future__ import annotations

import gzip
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnist_flow import data
from mnist_flow.idx import encode_idx



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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mirror:
    """A loopback HTTP server: /good/ serves the files, /wrong/ serves other bytes, /missing/ gives 404."""

    url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)

    def good(self) -> str:
        return f"{self.url}/good/"
