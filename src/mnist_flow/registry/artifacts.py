"""Content-addressed model artifacts on any persistent fsspec filesystem (local folder, s3://, gcs://...).

Writes are atomic: the bytes go to a temporary name in the destination folder and are then
moved into place, so a reader never sees a half-written file. A store that cannot keep its files
(``memory://``, which lives as long as one process) or cannot write them (``http://``, ``zip://``)
is refused up front; a full disk or a read-only folder ends in one StorageError. Reads only
follow URIs inside the store's root.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from mnist_flow.errors import ArtifactIntegrityError, ConfigError, RegistryError
from mnist_flow.storage.fsutil import atomic_write, raise_storage_error

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


#: fsspec protocols whose files do not outlive the process: registry rows would point at nothing.
VOLATILE_PROTOCOLS = frozenset({"memory"})
#: fsspec protocols that cannot be written to.
READ_ONLY_PROTOCOLS = frozenset(
    {"http", "https", "github", "git", "zip", "tar", "libarchive", "reference", "data", "jupyter", "hf"}
)
ARTIFACTS_FIX = "Set MNIST_FLOW_ARTIFACTS_URL to a folder on disk or a persistent object store (e.g. s3://bucket/path)."
WRITE_FIX = "Free some space or make the folder writable, or set MNIST_FLOW_ARTIFACTS_URL to another location."


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def open_filesystem(url: str, *, volatile_ok: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path)`` of an artifacts URL; ConfigError for one that cannot keep a model's files."""
    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except (ValueError, ImportError, TypeError) as exc:
        raise ConfigError(f"Cannot use the artifacts URL {url!r}: {exc}.", fix=ARTIFACTS_FIX) from None
    protocols = _protocols(fs)
    if not volatile_ok and (isinstance(fs, MemoryFileSystem) or protocols & VOLATILE_PROTOCOLS):
        raise ConfigError(
            f"The artifacts URL {url!r} is in memory: its files vanish when the process ends, "
            "while the registry keeps pointing at them.",
            fix=ARTIFACTS_FIX,
        )
    if protocols & READ_ONLY_PROTOCOLS:
        raise ConfigError(
            f"The artifacts URL {url!r} uses {min(protocols & READ_ONLY_PROTOCOLS)}://, which cannot be written to.",
            fix=ARTIFACTS_FIX,
        )
    if isinstance(fs, LocalFileSystem) and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"The artifacts folder {root} is a file, not a folder.", fix=ARTIFACTS_FIX)
    return fs, root


def check_artifacts_url(url: str) -> str:
    """Return ``url`` if artifacts can be kept there (see :func:`open_filesystem`), else raise ConfigError."""
    open_filesystem(url)
    return url


class ArtifactStore:
    """Artifacts under ``root_url``; ``write`` returns the URI that ``read`` accepts.

    ``volatile_ok`` admits ``memory://`` (tests of the generic fsspec path only: nothing survives the process).
    """

    def __init__(self, root_url: str, *, volatile_ok: bool = False) -> None:
        self.root_url = str(root_url)
        self._fs, root = open_filesystem(self.root_url, volatile_ok=volatile_ok)
        self._root = root.rstrip("/") or "/"
        self._local = isinstance(self._fs, LocalFileSystem)

    def _path(self, relpath: str) -> str:
        return f"{self._root.rstrip('/')}/{validate_relpath(relpath)}"

    def relpath_of(self, uri: str) -> str:
        """The path of ``uri`` inside the root; ArtifactIntegrityError if it points anywhere else.

        A registry row is data that can be edited: a URI on another filesystem, outside the root,
        through '..' or a symlink leading out of the root is refused before anything is read.
        """
        try:
            fs, path = fsspec.core.url_to_fs(str(uri))
        except (ValueError, ImportError, TypeError):
            fs, path = None, ""
        inside = None
        if fs is not None and _protocols(fs) & _protocols(self._fs):
            if self._local:
                root, target = os.path.realpath(self._root), os.path.realpath(path)
            else:
                root, target = posixpath.normpath(self._root), posixpath.normpath(path)
            prefix = root.rstrip("/") + "/"
            if target.startswith(prefix):
                inside = target[len(prefix) :]
        try:
            return validate_relpath(inside) if inside else validate_relpath("")
        except ConfigError:
            raise ArtifactIntegrityError(
                f"The registry points at the artifact {uri}, outside the artifact root {self.root_url}: "
                "refused (the row was edited, or MNIST_FLOW_ARTIFACTS_URL changed since it was registered).",
                fix="Set MNIST_FLOW_ARTIFACTS_URL to the root the model was registered under, or register the "
                "model again.",
            ) from None

    def write(self, relpath: str, data: bytes) -> str:
        """Write ``data`` atomically at ``relpath`` (replacing any previous file) and return its URI."""
        path = self._path(relpath)
        what = f"the model artifact {relpath}"
        if self._local:
            atomic_write(path, data, suffix=".tmp", sync_folder=True, what=what, fix=WRITE_FIX)
            return self._fs.unstrip_protocol(path)
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            self._fs.makedirs(folder, exist_ok=True)
            self._fs.pipe_file(tmp, data)
            try:
                self._fs.mv(tmp, path)
            finally:
                if self._fs.exists(tmp):
                    self._fs.rm(tmp)
        except OSError as exc:
            raise_storage_error(exc, path, what, fix=WRITE_FIX)
            raise
        return self._fs.unstrip_protocol(path)

    def read(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes at ``uri`` (as returned by ``write``); RegistryError if it is missing or outside the root.

        With ``max_bytes``, a larger file is refused (ArtifactIntegrityError) before it is read.
        """
        self.relpath_of(uri)
        try:
            with fsspec.open(uri, "rb") as handle:
                if max_bytes is None:
                    return handle.read()
                data = handle.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ArtifactIntegrityError(
                        f"artifact {uri} is larger than {max_bytes:,} bytes: it is not a file mnist-flow wrote",
                        fix="Restore the original file from a backup, or register the model again.",
                    )
                return data
        except FileNotFoundError:
            raise RegistryError(
                f"Artifact {uri} does not exist.",
                fix="Restore the artifacts folder (MNIST_FLOW_ARTIFACTS_URL) or re-register the model.",
            ) from None
