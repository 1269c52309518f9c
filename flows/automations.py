"""The service's Prefect automations, created or updated by `make deploy` (idempotent).

    python flows/automations.py --zombie-seconds 90     # after `prefect deploy` (needs PREFECT_API_URL)

Two automations, both scoped to this project's deployments (looked up by name, so a redeploy that
changed their ids is picked up by the next `make deploy`):

- **crash zombie runs** (Prefect's documented zombie detection, docs "detect zombie flows"): a flow
  run of `mnist/train`, `mnist-trials/worker` or `mnist-data-check/check` that sent a heartbeat
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, `make worker` sets it) and then neither another heartbeat
  nor a final state within ``--zombie-seconds`` is marked Crashed.
- **retry crashed training runs**: a `mnist/train` run that became Crashed on its first run
  (``prefect.run-count`` 0 or 1: a zombie, or a flow-run process the worker saw die) is set back to
  Scheduled (``AwaitingRetry``), like the UI's Retry button: same flow run, so the same run key, and
  the next free worker resumes its study. Flow ``retries`` do not cover this: Prefect retries a flow in
  its own process, and a crashed process cannot. A run that crashes again (run count 2) stays Crashed.

Each is matched by name: updated in place if it exists (an operator's *disabled* state is kept),
created otherwise, so running this twice leaves exactly one of each.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any, cast

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

TRAIN = "mnist/train"
WATCHED = (TRAIN, "mnist-trials/worker", "mnist-data-check/check")
ZOMBIE_NAME = "mnist-flow: crash zombie flow runs"
RETRY_NAME = "mnist-flow: retry crashed training runs"
FINAL_EVENTS = {
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
}


def _deployments(ids: list[str]) -> ResourceSpecification:
    return ResourceSpecification(
        {"prefect.resource.id": [f"prefect.deployment.{i}" for i in ids], "prefect.resource.role": "deployment"}
    )


def zombie_automation(deployment_ids: list[str], within_seconds: int) -> Automation:
    """Mark Crashed a run whose heartbeats stopped for ``within_seconds`` (Prefect's documented automation)."""
    return Automation(
        name=ZOMBIE_NAME,
        description="A flow run of mnist-flow that stopped sending heartbeats is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=_deployments(deployment_ids),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_seconds} s: the flow-run process is gone "
                "(marked by the mnist-flow zombie automation).",
            )
        ],
    )


def retry_automation(train_deployment_id: str) -> Automation:
    """Reschedule (same flow run) a `mnist/train` run that crashed on its first run."""
    return Automation(
        name=RETRY_NAME,
        description="A mnist/train run that crashed on its first run is scheduled again (same run, resumes).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification(
                {"prefect.resource.id": ["prefect.flow-run.*"], "prefect.run-count": ["0", "1"]}
            ),
            match_related=_deployments([train_deployment_id]),
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message="Retrying after a crash (mnist-flow retry automation).",
            )
        ],
    )


def deployment_ids(names: tuple[str, ...] = WATCHED) -> dict[str, str]:
    """Ids of the deployments that exist, by ``flow/deployment`` name."""
    from prefect.exceptions import ObjectNotFound

    found = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found[name] = str(client.read_deployment_by_name(name).id)
            except ObjectNotFound:
                continue
    return found


def upsert(automation: Automation) -> tuple[str, Automation]:
    """Update the automation of the same name (keeping whether it is enabled), else create it."""
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
    if existing:
        first, *extra = existing
        automation.id, automation.enabled = first.id, first.enabled
        automation.update()
        for duplicate in extra:  # left by an older, non-idempotent setup
            Automation(**duplicate.model_dump()).delete()
        return "updated", automation
    return "created", cast(Automation, automation.create())


def ensure_automations(zombie_seconds: int) -> list[tuple[str, Any]]:
    """Create or update both automations; needs `mnist/train` deployed."""
    ids = deployment_ids()
    if TRAIN not in ids:
        raise SystemExit(f"The deployment {TRAIN} does not exist on this Prefect API: run `prefect deploy` first.")
    return [upsert(zombie_automation(sorted(ids.values()), zombie_seconds)), upsert(retry_automation(ids[TRAIN]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--zombie-seconds",
        type=int,
        default=90,
        help="seconds without a flow-run heartbeat before a run is marked Crashed (default 90: "
        "three heartbeats of 30 s)",
    )
    args = parser.parse_args(argv)
    if args.zombie_seconds < 31:
        parser.error("--zombie-seconds must exceed the shortest heartbeat Prefect allows (30 s)")
    for what, automation in ensure_automations(args.zombie_seconds):
        print(f"automation {what}: {automation.name} ({automation.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
