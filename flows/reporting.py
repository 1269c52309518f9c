"""Prefect artifacts of the `mnist` flow: what a run decided, readable in the Prefect UI.

Each artifact is a small task with a fixed key, so the UI shows its history across runs. The
markdown is built by plain functions (testable without Prefect); URLs are masked.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from mnist_flow.formatting import format_value
from mnist_flow.storage.db import mask_url
from mnist_flow.summary import RunSummary

DECISION_KEY = "promotion-decision"


def _fmt(value: Any, digits: int = 4) -> str:
    return format_value(value, digits, small=1e-3)  # p-values below 0.001 keep their digits


def decision_markdown(decision: Any, version: Any, database_url: str) -> str:
    """The promotion decision of one run as markdown (``decision`` None: nothing left to decide)."""
    lines = [f"# Promotion decision: {version.name} v{version.version}", ""]
    if decision is None:
        lines += ["No new decision: this (retried) run's model is already the champion.", ""]
    else:
        lines += [
            f"**Outcome: {decision.outcome}**: {decision.reason}",
            "",
            "| | challenger | champion |",
            "|---|---|---|",
            f"| test accuracy | {_fmt(decision.challenger_accuracy)} | {_fmt(decision.champion_accuracy)} |",
            f"| correct only by | {_fmt(decision.b)} | {_fmt(decision.c)} |",
            "",
            f"McNemar p-value: {_fmt(decision.p_value)}; margin {_fmt(decision.margin)}; "
            f"alpha {_fmt(decision.alpha) if decision.alpha is not None else 'off'}.",
            "",
        ]
    champion = "champion" in getattr(version, "aliases", ())
    lines += [
        f"Registered: `{version.name}` v{version.version} ({'champion' if champion else 'challenger'}), "
        f"dataset `{version.dataset_name}` fingerprint `{version.dataset_fingerprint[:16]}`.",
        f"Registry: `{mask_url(database_url)}`. Override by hand with "
        f"`mnist-flow registry promote {version.version} --reason ...` or `mnist-flow registry rollback --reason ...`; "
        "`mnist-flow registry history` lists every decision.",
    ]
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE)
def publish_decision(decision: Any, version: Any, database_url: str) -> Any:
    """Attach the promotion decision to the flow run as the markdown artifact ``promotion-decision``."""
    description = "no new decision" if decision is None else f"{decision.outcome}: {version.name} v{version.version}"
    return create_markdown_artifact(
        markdown=decision_markdown(decision, version, database_url), key=DECISION_KEY, description=description
    )


# --- review artifacts: run summary, trials table, dashboard link (issue 6) ---------------------------

SUMMARY_KEY = "mnist-summary"
TRIALS_KEY = "mnist-trials"
DASHBOARD_KEY = "optuna-dashboard"


def dashboard_link(dashboard_url: str, study: Any) -> str:
    """The study's page on optuna-dashboard, or its front page; credentials in the URL are dropped."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dashboard_url.strip())
    host = parts.netloc.rpartition("@")[2]  # the browser asks for the login; the artifact never holds it
    base = mask_url(urlunsplit((parts.scheme, host, parts.path, "", ""))).rstrip("/")
    study_id = getattr(study, "_study_id", None)
    return f"{base}/dashboard/studies/{study_id}" if isinstance(study_id, int) else f"{base}/dashboard"


@task(cache_policy=NO_CACHE)
def publish_summary(summary: RunSummary) -> Any:
    """The run's summary (best params, accuracies, champion comparison, stage times, data fingerprint)."""
    description = f"{summary.model.name} v{summary.model.version}: test accuracy {_fmt(summary.metrics.test_accuracy)}"
    return create_markdown_artifact(markdown=summary.markdown(), key=SUMMARY_KEY, description=description)


@task(cache_policy=NO_CACHE)
def publish_trials(study: Any) -> Any:
    """Every trial of the study as a table (the rows of trials.csv, built with pandas)."""
    from mnist_flow.review.report import table_records, trials_frame

    frame = trials_frame(study)
    return create_table_artifact(
        table=table_records(frame), key=TRIALS_KEY, description=f"{len(frame)} trials of study {study.study_name}"
    )


@task(cache_policy=NO_CACHE)
def publish_dashboard_link(dashboard_url: str, study: Any) -> Any:
    """A link to the study in optuna-dashboard (only called when MNIST_FLOW_DASHBOARD_URL is set)."""
    return create_link_artifact(
        link=dashboard_link(dashboard_url, study),
        key=DASHBOARD_KEY,
        link_text=f"study {study.study_name} in optuna-dashboard",
        description="optuna-dashboard (start it with `mnist-flow dashboard`)",
    )


def publish_review(summary: RunSummary, study: Any, version: Any, dashboard_url: str | None) -> None:
    """End of the flow: the review artifacts, and the registered version on its trial's dashboard note."""
    from mnist_flow.review.dashboard import annotate_trials

    _ = publish_summary(summary)  # Prefect's artifact helpers are typed "id | coroutine": sync here
    _ = publish_trials(study)
    if dashboard_url:
        _ = publish_dashboard_link(dashboard_url, study)
    source = [t for t in study.get_trials(deepcopy=False) if t.number == version.trial_number]
    if source and version.study_name == study.study_name:
        try:
            annotate_trials(study, {version.trial_number: version}, trials=source)
        except Exception as exc:  # noqa: BLE001 - a dashboard note is not worth failing a finished run
            get_run_logger().warning(
                "could not note v%s on trial #%s: %s", version.version, version.trial_number, mask_url(str(exc))
            )
