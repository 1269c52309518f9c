"""The service entry points: what docker/compose.yaml runs, and what the end-to-end tests run for real.

tests/code/test_docker_files.py checks every compose command against :data:`ENTRY_POINTS` (bind
address and port aside); tests/e2e/test_scale_out.py starts the services with these same commands.
"""

from __future__ import annotations

#: Options whose values legitimately differ between a container and a test (where to listen).
PLACE_OPTIONS = frozenset({"--host", "--port"})

DEPLOY = ["make", "-o", "install", "deploy"]
WORKER = ["make", "-o", "install", "worker"]


def prefect_server(host: str, port: int) -> list[str]:
    """A Prefect server (its database from PREFECT_API_DATABASE_CONNECTION_URL)."""
    return ["prefect", "server", "start", "--host", host, "--port", str(port), "--analytics-off"]


def dashboard(host: str, port: int) -> list[str]:
    """optuna-dashboard on the study database (MNIST_FLOW_DATABASE_URL)."""
    return ["mnist-flow", "dashboard", "--host", host, "--port", str(port)]


def model_api(host: str, port: int) -> list[str]:
    """The champion's HTTP API (tests/e2e/test_serve.py)."""
    return ["mnist-flow", "serve", "--host", host, "--port", str(port)]


#: compose service -> the command the e2e test runs for it.
ENTRY_POINTS: dict[str, list[str]] = {
    "prefect-server": prefect_server("127.0.0.1", 4200),
    "deploy": DEPLOY,
    "worker": WORKER,
    "optuna-dashboard": dashboard("127.0.0.1", 8080),
    "model-api": model_api("127.0.0.1", 8000),
}


def normalise(command: list[str]) -> list[str]:
    """``command`` without the values of :data:`PLACE_OPTIONS` (and without a path on the program)."""
    out: list[str] = []
    skip = False
    for index, arg in enumerate(command):
        if skip:
            skip = False
            continue
        if arg in PLACE_OPTIONS:
            out.append(arg)
            skip = True
            continue
        out.append(arg.rsplit("/", 1)[-1] if index == 0 else arg)
    return out
