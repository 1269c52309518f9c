"""The `mnist-data-check` flow: fingerprint the configured data source; emit an event when it changed.

Deployed as `mnist-data-check/check` on a short interval schedule (deployments/prefect.yaml). It reads
the source exactly as the `mnist` flow would (same parameters, same validation and fingerprint: the
SHA-256 of the decoded data, which is in the lineage of every model) and compares the fingerprint with
the last one it saw for that source, kept in a Prefect variable. On the very first check there is
nothing to compare with but the champion's data: a champion trained on other data counts as a change.

When the fingerprint changed it emits one ``mnist-flow.data.changed`` event; the `train` deployment's
trigger (prefect.yaml ``triggers:``) then starts one `mnist/train` run on the same data. Unchanged data
emit nothing. The variable is updated after the event is emitted, so a check killed in between
re-emits at most once rather than never.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from mnist_flow import pipeline
from mnist_flow.params import RunParams
from mnist_flow.registry.store import Registry
from mnist_flow.settings import load_settings

EVENT = "mnist-flow.data.changed"


def variable_name(dataset: str, source: str, data_dir: str | None) -> str:
    """The Prefect variable that remembers the last fingerprint of one source (names: [a-z0-9_-])."""
    where = hashlib.sha256(str(data_dir or "").encode()).hexdigest()[:12]
    return f"mnist_flow_data_{dataset.replace('-', '_')}_{source}_{where}"


def resource(dataset: str, source: str, data_dir: str | None) -> dict[str, str]:
    """The event's resource: one per dataset and source (the trigger matches ``mnist-flow.dataset.*``)."""
    labels = {
        "prefect.resource.id": f"mnist-flow.dataset.{dataset}",
        "prefect.resource.name": dataset,
        "mnist-flow.source": source,
    }
    if data_dir:
        labels["mnist-flow.data-dir"] = data_dir
    return labels


@flow(name="mnist-data-check", log_prints=True)
def data_check(
    dataset: Literal["mnist", "fashion-mnist"] = "mnist",
    source: Literal["auto", "download", "dir", "sample"] = "auto",
    data_dir: str | None = None,
    n_trials: int = 10,
    max_epochs: int = 8,
    final_epochs: int = 24,
) -> dict[str, Any]:
    """Fingerprint the data of (dataset, source, data_dir); emit ``mnist-flow.data.changed`` if it changed.

    ``n_trials``, ``max_epochs`` and ``final_epochs`` travel in the event: the budgets of the retraining.
    """
    logger = get_run_logger()
    params = RunParams.parse(
        dataset=dataset,
        source=source,
        data_dir=data_dir,
        n_trials=n_trials,
        max_epochs=max_epochs,
        final_epochs=final_epochs,
    )
    settings = load_settings()
    bundle = pipeline.load_data(params, settings)
    name = variable_name(dataset, source, data_dir)
    previous = Variable.get(name, default=None)
    seen = previous.get("fingerprint") if isinstance(previous, dict) else None
    if seen is None:  # first check of this source: compare with what the champion was trained on
        with Registry.from_settings(settings) as registry:
            champion = registry.champion(pipeline.model_name(dataset))
        seen = champion.dataset_fingerprint if champion is not None else None
        if seen is None:
            logger.info(
                "data %s from %s: fingerprint %s recorded (first check, no champion yet)",
                dataset,
                source,
                bundle.fingerprint[:16],
            )
    changed = seen is not None and seen != bundle.fingerprint
    if changed:
        emit_event(
            event=EVENT,
            resource=resource(dataset, source, data_dir),
            payload={
                "dataset": dataset,
                "source": source,
                "data_dir": data_dir,
                "n_trials": n_trials,
                "max_epochs": max_epochs,
                "final_epochs": final_epochs,
                "fingerprint": bundle.fingerprint,
                "previous": seen,
            },
        )
        logger.info(
            "data %s from %s changed: fingerprint %s (was %s); emitted %s",
            dataset,
            source,
            bundle.fingerprint[:16],
            (seen or "")[:16],
            EVENT,
        )
    elif seen is not None:
        logger.info("data %s from %s unchanged (fingerprint %s)", dataset, source, bundle.fingerprint[:16])
    if previous is None or changed:
        Variable.set(name, {"fingerprint": bundle.fingerprint, "dataset": dataset, "source": source}, overwrite=True)
    return {
        "dataset": dataset,
        "source": source,
        "fingerprint": bundle.fingerprint,
        "previous": seen,
        "changed": changed,
    }
