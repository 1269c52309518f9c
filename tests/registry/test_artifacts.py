"""The artifact store: atomic writes, round trips, and paths that cannot escape the root."""

from __future__ import annotations

import pytest

from mnist_flow.errors import ConfigError, RegistryError
from mnist_flow.registry.artifacts import ArtifactStore, sha256


def test_write_then_read_round_trip_leaves_no_temp_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.write("m/abc/model.safetensors", b"weights")
    assert store.read(uri) == b"weights"
    assert [p.name for p in (tmp_path / "root" / "m" / "abc").iterdir()] == ["model.safetensors"]


def test_write_replaces_existing_file(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write("a.bin", b"old")
    assert store.read(store.write("a.bin", b"new")) == b"new"


def test_the_generic_fsspec_path_round_trips_on_an_explicitly_volatile_memory_store():
    store = ArtifactStore("memory://mnist-flow-test", volatile_ok=True)  # only tests may opt in
    assert store.read(store.write("x/y.bin", b"data")) == b"data"


@pytest.mark.parametrize("relpath", ["../x", "a/../../b", "/etc/passwd", "", "a//b", ".hidden", "a\\b", "a b",
                                     "a/./b"])
def test_paths_escaping_the_root_are_refused(tmp_path, relpath):
    with pytest.raises(ConfigError):
        ArtifactStore(str(tmp_path)).write(relpath, b"x")


def test_missing_artifact_is_a_registry_error(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        ArtifactStore(str(tmp_path)).read(f"file://{tmp_path}/nope.bin")


def test_sha256_matches_known_digest():
    assert sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
