"""Serve the deployments of ``deployments/prefect.yaml`` from this one process: no work pool, no worker.

    python flows/serve.py            # or: make serve (needs a Prefect server: PREFECT_API_URL)

The deployments (names, parameters, cron schedules with their timezone, concurrency limit,
parameter-schema enforcement) are read from ``deployments/prefect.yaml``, so `make deploy` and
`make serve` publish the same thing. Pull steps and work pools do not apply here: this process runs
the flow code of this checkout. Stopping it leaves the schedules active (``pause_on_shutdown=False``),
so the nightly run is not silently lost after a restart.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron, Interval, Schedule
from prefect.utilities.templating import apply_values

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"


def load_deployment_configs(path: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments:`` of a prefect.yaml, anchors expanded and ``{{ $ENV }}`` placeholders applied."""
    document = yaml.safe_load(path.read_text())
    return cast(
        list[dict[str, Any]], apply_values(document.get("deployments") or [], dict(os.environ), remove_notset=False)
    )


def to_schedule(config: dict[str, Any]) -> Schedule:
    """One ``schedules:`` item of prefect.yaml as a Prefect schedule (cron or interval)."""
    common = {
        "timezone": config.get("timezone"),
        "active": config.get("active", True),
        "parameters": config.get("parameters") or None,
        "slug": config.get("slug"),
    }
    if "cron" in config:
        return Cron(config["cron"], day_or=config.get("day_or", True), **common)
    if "interval" in config:
        return Interval(config["interval"], **common)
    raise ValueError(f"Only cron and interval schedules can be served, got {sorted(config)}.")


def to_concurrency(value: int | dict[str, Any] | None) -> int | ConcurrencyLimitConfig | None:
    """prefect.yaml's ``concurrency_limit`` (a number or a mapping) as ``to_deployment`` takes it."""
    return ConcurrencyLimitConfig(**value) if isinstance(value, dict) else value


def to_trigger(spec: dict[str, Any]) -> Any:
    """One ``triggers:`` item of prefect.yaml as a deployment trigger (e.g. retrain on mnist-flow.data.changed)."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    return TypeAdapter(DeploymentTriggerTypes).validate_python(dict(spec))


def build_deployment(config: dict[str, Any], repo: Path = REPO) -> RunnerDeployment:
    """A runner deployment from one prefect.yaml deployment (work pool and pull steps are ignored)."""
    flow: Any = load_flow_from_entrypoint(str(repo / config["entrypoint"]))
    return cast(
        RunnerDeployment,
        flow.to_deployment(
            name=config["name"],
            description=config.get("description"),
            tags=config.get("tags"),
            parameters=config.get("parameters") or {},
            schedules=[to_schedule(item) for item in config.get("schedules") or []],
            concurrency_limit=to_concurrency(config.get("concurrency_limit")),
            enforce_parameter_schema=config.get("enforce_parameter_schema", True),
            triggers=[to_trigger(spec) for spec in config.get("triggers") or []],
        ),
    )


def build_deployments(path: Path = PREFECT_FILE, repo: Path = REPO) -> list[RunnerDeployment]:
    """Every deployment of ``path``, ready for :func:`prefect.serve`."""
    return [build_deployment(config, repo) for config in load_deployment_configs(path)]


def main() -> int:
    """Serve until interrupted; schedules stay active when this process stops."""
    serve(*build_deployments(), pause_on_shutdown=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
