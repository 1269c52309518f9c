"""Registering, listing, aliases, decisions, integrity and concurrency of the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from registry_helpers import register, run_concurrently, tiny_model

from mnist_flow.errors import ArtifactIntegrityError, ConfigError, RegistryError
from mnist_flow.registry.promotion import decide
from mnist_flow.registry.store import Lineage, Registry

REGISTER_SCRIPT = """
import sys, time, torch
from mnist_flow.training.model import MLP
from mnist_flow.registry.store import Lineage, Registry
start_at, db_url, art_url, worker = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
reg = Registry(db_url, art_url)
reg.migrate()
time.sleep(max(0.0, start_at - time.time()))
for i in range(5):
    torch.manual_seed(int(worker) * 100 + i)
    v = reg.register("mnist", MLP((4,)), sidecar={}, params={}, metrics={}, lineage=Lineage("mnist", "fp"))
    print(v.version)
"""


def test_register_assigns_increasing_versions_and_lists_them(registry):
    first = register(registry, seed=1)
    second = register(registry, seed=2)
    register(registry, "fashion", seed=3)
    assert (first.version, second.version) == (1, 2)
    assert registry.names() == ["fashion", "mnist"]
    assert [v.version for v in registry.list_versions("mnist")] == [1, 2]
    assert [(v.name, v.version) for v in registry.list_versions()] == [("fashion", 1), ("mnist", 1), ("mnist", 2)]
    assert registry.get("mnist", 2).artifact_sha256 == second.artifact_sha256
    assert registry.get("mnist", "2") == registry.get("mnist", 2)


def test_to_dict_has_documented_keys(registry):
    data = register(registry, study_name="study", trial_number=4, flow_run_id="run-1").to_dict()
    assert {"version", "name", "aliases", "params", "metrics", "dataset", "artifact", "lineage",
            "created_at"} <= set(data)
    assert set(data["dataset"]) == {"name", "fingerprint"} and set(data["artifact"]) == {"uri", "sha256"}
    assert data["lineage"]["study_name"] == "study" and data["lineage"]["trial_number"] == 4
    assert data["lineage"]["flow_run_id"] == "run-1" and data["lineage"]["seed"] == 0
    assert set(data["lineage"]["code_version"]) == {"package", "git_commit"}
    assert data["created_at"].endswith("+00:00")


def test_champion_moves_only_through_decisions_and_aliases(registry):
    v1, v2 = register(registry, seed=1), register(registry, seed=2)
    assert registry.champion("mnist") is None
    first = decide(torch.ones(4, dtype=torch.bool), None, challenger_fingerprint="fp-1", champion_fingerprint=None,
                   margin=0.0, alpha=None)
    registry.record_decision("mnist", first, challenger_version=v1.version, champion_version=None)
    assert registry.champion("mnist").version == 1
    assert registry.get("mnist", "champion").aliases == ("champion",)
    kept = decide(torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), challenger_fingerprint="fp-1",
                  champion_fingerprint="fp-1", margin=0.0, alpha=None)
    registry.record_decision("mnist", kept, challenger_version=v2.version, champion_version=1)
    assert registry.champion("mnist").version == 1
    registry.set_alias("mnist", "staging", 2)
    assert registry.get("mnist", "staging").version == 2
    assert [h["outcome"] for h in registry.history("mnist")] == ["first", "kept"]


def test_unknown_version_alias_or_name_names_what_exists(registry):
    register(registry)
    with pytest.raises(RegistryError, match="versions: 1"):
        registry.get("mnist", 9)
    with pytest.raises(RegistryError, match=r"aliases: \(none\)"):
        registry.get("mnist", "champion")
    with pytest.raises(RegistryError, match="registered names: mnist"):
        registry.get("other", 1)
    with pytest.raises(RegistryError):
        registry.set_alias("mnist", "staging", 5)


def test_promote_and_rollback_follow_the_decision_history(registry):
    for seed in (1, 2, 3):
        register(registry, seed=seed)
    registry.promote("mnist", 1, reason="baseline")
    registry.promote("mnist", 2, reason="better")
    registry.promote("mnist", 3, reason="best")
    assert registry.rollback("mnist", reason="3 is broken").version == 2
    assert registry.rollback("mnist", reason="2 too").version == 1
    assert registry.champion("mnist").version == 1
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback("mnist", reason="nothing left")
    history = registry.history("mnist")
    assert [h["outcome"] for h in history] == ["promoted"] * 3 + ["rolled_back"] * 2
    assert all(h["actor"] == "user" for h in history)
    assert history[3]["champion_version"] == 3 and "3 is broken" in history[3]["reason"]


def test_loaded_model_gives_same_outputs_and_sidecar(registry):
    model = tiny_model(7)
    version = registry.register("mnist", model, sidecar={"normalization": {"mean": 0.13, "std": 0.31}},
                                params={}, metrics={}, lineage=Lineage("mnist", "fp"))
    loaded, sidecar, loaded_version = registry.load("mnist", version.version)
    x = torch.randn(5, 784)
    assert torch.equal(loaded(x), model(x))
    assert sidecar["normalization"] == {"mean": 0.13, "std": 0.31}
    assert sidecar["architecture"] == model.architecture()
    assert loaded_version == version


def test_tampered_artifact_raises_integrity_error(registry):
    version = register(registry)
    path = Path(version.artifact_uri.removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="was modified"):
        registry.load("mnist", 1)


def test_idempotency_key_returns_existing_version(registry):
    first = register(registry, seed=1, idempotency_key="flow-run-1/final")
    again = register(registry, seed=2, idempotency_key="flow-run-1/final")
    assert again == first
    assert len(registry.list_versions("mnist")) == 1


@pytest.mark.parametrize("name", ["../x", "a/b", "", "Upper", "-lead", "x" * 65, "a b"])
def test_invalid_names_are_refused(registry, name):
    with pytest.raises(ConfigError):
        register(registry, name)


def test_invalid_alias_is_refused(registry):
    register(registry)
    with pytest.raises(ConfigError):
        registry.set_alias("mnist", "../champion", 1)


def test_artifact_written_before_row_and_row_never_without_artifact(registry, monkeypatch):
    from mnist_flow.registry.artifacts import ArtifactStore

    def fail(self, relpath, data):
        raise OSError("disk full")

    monkeypatch.setattr(ArtifactStore, "write", fail)
    with pytest.raises(OSError):
        register(registry)
    assert registry.list_versions() == []


def _concurrent_registrations(db_url: str, art_url: str) -> list[int]:
    outputs = run_concurrently(REGISTER_SCRIPT, [[db_url, art_url, "1"], [db_url, art_url, "2"]], timeout=120)
    return sorted(int(line) for out in outputs for line in out.split())


def test_concurrent_registrations_get_distinct_versions_sqlite(sqlite_url, tmp_path):
    versions = _concurrent_registrations(sqlite_url, str(tmp_path / "art"))
    assert versions == list(range(1, 11))
    assert [v.version for v in Registry(sqlite_url, str(tmp_path / "art")).list_versions()] == versions


def test_concurrent_registrations_get_distinct_versions_postgres(pg_url, tmp_path):
    versions = _concurrent_registrations(pg_url, str(tmp_path / "art"))
    assert versions == list(range(1, 11))
    reg = Registry(pg_url, str(tmp_path / "art"))
    assert [v.version for v in reg.list_versions()] == versions
    reg.dispose()


def _edit_sidecar(version, **architecture: object) -> None:
    import json

    path = Path(version.sidecar_uri.removeprefix("file://"))
    sidecar = json.loads(path.read_text())
    sidecar["architecture"].update(architecture)
    path.write_text(json.dumps(sidecar))


@pytest.mark.parametrize("architecture", [{"hidden": [16]}, {"hidden": [8, 8]}, {"num_classes": 3},
                                          {"type": "cnn"}], ids=["wider", "deeper", "classes", "type"])
def test_sidecar_disagreeing_with_the_weights_raises_integrity_error(registry, architecture):
    version = register(registry)  # MLP((8,)): the row records the SHA-256 of the weights and of the sidecar
    _edit_sidecar(version, **architecture)
    with pytest.raises(ArtifactIntegrityError) as caught:
        registry.load("mnist", 1)
    assert "cannot be trusted" in caught.value.message and "the file was modified" in caught.value.message
    assert version.sidecar_uri in caught.value.message and caught.value.fix


def test_unreadable_weights_with_a_matching_checksum_raise_integrity_error(registry):
    from sqlalchemy import update

    from mnist_flow.registry.artifacts import sha256
    from mnist_flow.registry.store import ModelVersionRow

    version = register(registry)
    garbage = b"not a safetensors file"
    Path(version.artifact_uri.removeprefix("file://")).write_bytes(garbage)
    with registry.engine.begin() as connection:  # as if the registry had recorded the bad bytes
        connection.execute(update(ModelVersionRow).values(artifact_sha256=sha256(garbage)))
    with pytest.raises(ArtifactIntegrityError, match="is not the weights of an MLP"):
        registry.load("mnist", 1)


def test_registry_as_context_manager_disposes_its_engine(sqlite_url, tmp_path):
    with Registry(sqlite_url, str(tmp_path / "artifacts")) as reg:
        register(reg)
        assert reg._engine is not None
    assert reg._engine is None
    assert [v.version for v in reg.list_versions()] == [1]  # still usable: a new engine on demand
    reg.dispose()


def test_resolve_name_picks_the_only_model_and_refuses_none_or_several(registry):
    with pytest.raises(RegistryError, match="No model is registered"):
        registry.resolve_name(None)
    register(registry)
    assert registry.resolve_name(None) == "mnist"
    assert registry.resolve_name("other") == "other"
    register(registry, "fashion")
    with pytest.raises(RegistryError, match="Several models are registered: fashion, mnist") as caught:
        registry.resolve_name(None)
    assert "--name" in caught.value.fix
