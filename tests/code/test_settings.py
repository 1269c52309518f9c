"""Settings: defaults under the home folder, environment overrides, and refusal of bad values."""

from __future__ import annotations

import pytest

from mnist_flow.errors import ConfigError
from mnist_flow.settings import load_settings


def test_defaults_live_under_the_home_folder(home):
    settings = load_settings()
    assert settings.resolved_database_url == f"sqlite:///{home / 'mnist-flow.db'}"
    assert settings.resolved_artifacts_url == str(home / "artifacts")
    assert settings.cache_dir == home / "data"
    assert not home.exists(), "reading settings must not create folders"


def test_environment_overrides_and_comma_separated_mirrors(home, monkeypatch):
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", "postgresql+psycopg://u:p@db/x")
    monkeypatch.setenv("MNIST_FLOW_MIRRORS", "http://a/, http://b/")
    monkeypatch.setenv("MNIST_FLOW_PROMOTION_ALPHA", "off")
    settings = load_settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u:p@db/x"
    assert settings.mirrors == ["http://a/", "http://b/"]
    assert settings.promotion_alpha is None


def test_an_unknown_setting_is_refused_with_the_valid_names(home, monkeypatch):
    monkeypatch.setenv("MNIST_FLOW_DATABSE_URL", "sqlite://")
    with pytest.raises(ConfigError, match="MNIST_FLOW_DATABSE_URL") as info:
        load_settings()
    assert "MNIST_FLOW_DATABASE_URL" in info.value.fix


def test_a_bad_value_is_refused_naming_the_variable(home, monkeypatch):
    monkeypatch.setenv("MNIST_FLOW_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="MNIST_FLOW_DEVICE"):
        load_settings()


def test_a_lower_case_typo_is_refused_and_a_lower_case_name_honoured(home, monkeypatch):
    monkeypatch.setenv("mnist_flow_threads", "3")
    assert load_settings().threads == 3
    monkeypatch.setenv("Mnist_Flow_Theads", "2")
    with pytest.raises(ConfigError, match="Mnist_Flow_Theads"):
        load_settings()


@pytest.mark.parametrize("setting", ["MNIST_FLOW_HOME", "MNIST_FLOW_DATA_DIR"])
@pytest.mark.parametrize("under", [False, True])
def test_a_folder_setting_that_names_a_file_is_refused(home, tmp_path, monkeypatch, setting, under):
    afile = tmp_path / "plain-file"
    afile.write_text("")
    monkeypatch.setenv(setting, str(afile / "sub" if under else afile))
    with pytest.raises(ConfigError, match=f"{setting}: .*not a folder"):
        load_settings()


def test_values_past_their_caps_are_refused(home, monkeypatch):
    for name, value in (("THREADS", "100000"), ("MAX_IMAGE_PIXELS", str(10**12)), ("HEARTBEAT_INTERVAL", "99999")):
        monkeypatch.setenv(f"MNIST_FLOW_{name}", value)
        with pytest.raises(ConfigError, match=f"MNIST_FLOW_{name}"):
            load_settings()
        monkeypatch.delenv(f"MNIST_FLOW_{name}")
