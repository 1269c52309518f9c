"""Content-addressed model artifacts on any fsspec filesystem (local folder, s3://, memory://...).

Writes are atomic: the bytes go to a temporary name in the destination folder and are then
moved into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mnist_flow.errors import ArtifactIntegrityError, ConfigError, RegistryError
from mnist_flow.fsutil import atomic_write

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def validate_relpath(relpath: str) -> str:
    """Return ``relpath`` if it stays inside the store root, else raise ConfigError.

    Each '/'-separated part must start with a letter or digit and use only letters, digits,
    '.', '_' and '-': this refuses '..', absolute paths, backslashes and empty parts.
    """
    parts = relpath.split("/") if isinstance(relpath, str) else []
    if not parts or not all(_SEGMENT.match(part) for part in parts):
        raise ConfigError(
            f"Artifact path {relpath!r} is not allowed.",
            fix="Use '/'-separated parts of letters, digits, '.', '_' and '-', not starting with '.' "
            "(no '..', no absolute paths).",
        )
    return relpath


class ArtifactStore:
    """Artifacts under ``root_url``; ``write`` returns the URI that ``read`` accepts."""

    def __init__(self, root_url: str) -> None:
        self.root_url = str(root_url)
        self._fs, root = fsspec.core.url_to_fs(self.root_url)
        self._root = root.rstrip("/") or "/"
        self._local = isinstance(self._fs, LocalFileSystem)

    def _path(self, relpath: str) -> str:
        return f"{self._root.rstrip('/')}/{validate_relpath(relpath)}"

    def uri(self, relpath: str) -> str:
        """The URI of ``relpath`` under the root (whether or not it exists)."""
        return self._fs.unstrip_protocol(self._path(relpath))

    def write(self, relpath: str, data: bytes) -> str:
        """Write ``data`` atomically at ``relpath`` (replacing any previous file) and return its URI."""
        path = self._path(relpath)
        if self._local:
            atomic_write(path, data, suffix=".tmp", sync_folder=True)
        else:
            folder, name = path.rsplit("/", 1)
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
            self._fs.makedirs(folder, exist_ok=True)
            self._fs.pipe_file(tmp, data)
            try:
                self._fs.mv(tmp, path)
            finally:
                if self._fs.exists(tmp):
                    self._fs.rm(tmp)
        return self._fs.unstrip_protocol(path)

    def read(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes at ``uri`` (as returned by ``write``); RegistryError if it is missing.

        With ``max_bytes``, a larger file is refused (ArtifactIntegrityError) before it is read.
        """
        try:
            with fsspec.open(uri, "rb") as handle:
                if max_bytes is None:
                    return handle.read()
                data = handle.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ArtifactIntegrityError(
                        f"artifact {uri} is larger than {max_bytes:,} bytes: it is not a file mnist-flow wrote",
                        fix="Restore the original file from a backup, or register the model again.")
                return data
        except FileNotFoundError:
            raise RegistryError(
                f"Artifact {uri} does not exist.",
                fix="Restore the artifacts folder (MNIST_FLOW_ARTIFACTS_URL) or re-register the model.",
            ) from None
