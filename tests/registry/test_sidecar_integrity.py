"""Every file that decides a model's behaviour is verified before it is used (issue 15, unverified metadata).

The sidecar (model.json: normalisation, architecture, preparation) is pinned by the SHA-256 in the
registry row (older rows: by the content key of the artifact folder); its values are checked; and
the network is built from the shapes in the verified weights' header, never from a claim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from registry_helpers import register, tiny_model
from sqlalchemy import update

from mnist_flow import cli
from mnist_flow.errors import ArtifactIntegrityError, ConfigError
from mnist_flow.registry import migrations
from mnist_flow.registry.artifacts import sha256
from mnist_flow.registry.store import Lineage, ModelVersionRow, architecture_from_safetensors
from mnist_flow.training.model import MLP


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _edit(version, change, *, record: bool = False, registry=None) -> None:
    """Change the sidecar; with ``record``, also record its new digest (as if the row had been written so)."""
    path = _path(version.sidecar_uri)
    sidecar = json.loads(path.read_text())
    change(sidecar)
    path.write_bytes(json.dumps(sidecar).encode())
    if record:
        with registry.engine.begin() as connection:
            connection.execute(update(ModelVersionRow).values(sidecar_sha256=sha256(path.read_bytes())))


def _set(section: str, **values):
    return lambda sidecar: sidecar.setdefault(section, {}).update(values)


def test_registration_records_the_sidecar_digest(registry):
    version = register(registry)
    assert version.sidecar_sha256 == sha256(_path(version.sidecar_uri).read_bytes())


@pytest.mark.parametrize("change", [_set("normalization", mean=0.9), _set("normalization", std=0.0),
                                    _set("input", preparation="fashion-item"),
                                    lambda s: s.__setitem__("classes", ["cat"] * 10)],
                         ids=["mean", "std-zero", "preparation", "classes"])
def test_an_edited_sidecar_is_refused_naming_the_file(registry, change):
    version = register(registry)
    _edit(version, change)
    with pytest.raises(ArtifactIntegrityError) as caught:
        registry.load("mnist", 1)
    assert f"artifact sidecar {version.sidecar_uri} cannot be trusted" in caught.value.message
    assert "the file was modified" in caught.value.message and "model.json" in caught.value.fix


def test_predict_with_an_edited_sidecar_is_one_message_and_exit_2(home, tmp_path, capsys):
    from mnist_flow.registry.store import Registry
    from mnist_flow.settings import load_settings

    with Registry.from_settings(load_settings()) as registry:
        version = register(registry)
    _edit(version, _set("normalization", mean=0.9))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28), 0).save(image)
    assert cli.main(["predict", "--model", "1", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: artifact sidecar {version.sidecar_uri} cannot be trusted")
    assert "Traceback" not in err


@pytest.mark.parametrize("change, problem", [
    (_set("normalization", std=0.0), "normalization std must be in"),
    (_set("normalization", mean=float("nan")), "normalization mean must be a finite number"),
    (_set("input", preparation="sharpen"), "unknown input preparation 'sharpen'"),
    (_set("input", height=32), "input height 32 is not supported"),
    (lambda s: s.__setitem__("classes", ["a", "b"]), "names 2 classes, the weights give 10"),
    (_set("architecture", hidden=[16]), "does not match the weights"),
])
def test_sidecar_values_are_checked_even_when_their_digest_matches(registry, change, problem):
    version = register(registry)
    _edit(version, change, record=True, registry=registry)
    with pytest.raises(ArtifactIntegrityError, match="cannot be trusted") as caught:
        registry.load("mnist", 1)
    assert problem in caught.value.message


def test_a_claimed_huge_architecture_allocates_nothing(registry, monkeypatch):
    version = register(registry)
    _edit(version, _set("architecture", hidden=[20000, 20000]), record=True, registry=registry)
    built = []
    original = MLP.__init__

    def spy(self, hidden=(500, 256), *args, **kwargs):
        built.append(tuple(hidden))
        original(self, hidden, *args, **kwargs)

    monkeypatch.setattr(MLP, "__init__", spy)
    with pytest.raises(ArtifactIntegrityError, match=r"does not match the weights \(.*'hidden': \[8\]"):
        registry.load("mnist", 1)
    assert built == []  # refused before any network was built


def test_the_network_is_built_from_the_verified_weights_header():
    model = MLP((24, 12))
    assert architecture_from_safetensors(model.to_safetensors()) == model.architecture()


@pytest.mark.parametrize("mangle, problem", [
    (lambda d: d[:4], "too short"),
    (lambda d: (10**9).to_bytes(8, "little") + d[8:], "header claims"),
    (lambda d: d + b"\0" * 4, "the file holds"),
    (lambda d: d[:-4], "the file holds"),
])
def test_weights_whose_header_does_not_add_up_are_refused(registry, mangle, problem):
    version = register(registry)
    path = _path(version.artifact_uri)
    data = mangle(path.read_bytes())
    path.write_bytes(data)
    with registry.engine.begin() as connection:  # as if the registry had recorded the bad bytes
        connection.execute(update(ModelVersionRow).values(artifact_sha256=sha256(data)))
    with pytest.raises(ArtifactIntegrityError, match="is not the weights of an MLP") as caught:
        registry.load("mnist", 1)
    assert problem in caught.value.message


def test_a_sidecar_with_unusable_values_is_refused_at_registration(registry):
    with pytest.raises(ConfigError, match="normalization std"):
        registry.register("mnist", tiny_model(), sidecar={"normalization": {"mean": 0.5, "std": 0.0}}, params={},
                          metrics={}, lineage=Lineage("mnist", "fp"))
    assert registry.list_versions() == []


def _downgrade_to_0001(registry) -> None:
    from alembic import command

    with registry.engine.begin() as connection:
        config = migrations._config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    registry.dispose()
    registry._migrated = False


def test_a_row_registered_before_0002_loads_and_its_sidecar_is_still_pinned(registry):
    """Rows of 0001 have no sidecar digest: the migration adds NULL, the artifact folder's content key pins it."""
    version = register(registry)
    model = tiny_model()
    _downgrade_to_0001(registry)

    loaded, sidecar, again = registry.load("mnist", 1)  # upgrades to head on first use

    assert again.sidecar_sha256 is None
    x = torch.randn(3, 784)
    assert torch.equal(loaded(x), model(x)) and sidecar["architecture"] == model.architecture()
    _edit(version, _set("normalization", std=0.01))
    with pytest.raises(ArtifactIntegrityError, match="does not match the content key"):
        registry.load("mnist", 1)


def test_the_migrations_add_the_sidecar_digest_column(registry):
    from sqlalchemy import inspect

    registry.migrate()
    columns = {c["name"]: c for c in inspect(registry.engine).get_columns("mnist_flow_model_versions")}
    assert columns["sidecar_sha256"]["nullable"]


@pytest.mark.parametrize("dataset, preparation", [("mnist", "mnist-digit"), ("fashion-mnist", "fashion-item"),
                                                  ("my-digits", "mnist-digit")])
def test_a_sidecar_without_a_preparation_gets_the_one_of_the_rows_dataset(registry, dataset, preparation):
    """Sidecars written before the preparation was recorded keep loading; an old Fashion-MNIST model gets items."""
    registry.register("m", tiny_model(), sidecar={"normalization": {"mean": 0.5, "std": 0.5, "scale": 255.0},
                                                  "input": {"height": 28, "width": 28, "background": "dark"}},
                      params={}, metrics={}, lineage=Lineage(dataset, "fp"))
    _, sidecar, _ = registry.load("m", 1)
    assert sidecar["input"]["preparation"] == preparation and sidecar["input"]["background"] == "dark"
