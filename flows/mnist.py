"""The `mnist` Prefect flow: fetch the data, tune with Optuna, train the best, evaluate, register.

Run it locally (Prefect starts a temporary API when PREFECT_API_URL is unset):

    python flows/mnist.py --help
    python flows/mnist.py --dataset fashion-mnist --source dir --data-dir /usr/share/datasets/fashion-mnist

or as a deployment: `prefect deployment run mnist/train --param n_trials=5`. Every task only
composes functions of the `mnist_flow` library; only I/O tasks (data, registry) retry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial
from prefect import Flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.callables import get_call_parameters

from flows.reporting import publish_decision, publish_review
from flows.trials import check_trial_workers, run_local_trial_workers, run_trial_workers
from mnist_flow import pipeline
from mnist_flow.data.datasets import DataBundle
from mnist_flow.errors import TRANSIENT_ERRORS, MnistFlowError, quiet_user_error_tracebacks
from mnist_flow.params import RunParams, with_run_parameters
from mnist_flow.progress import LogProgress, quiet_optuna
from mnist_flow.registry.promotion import Decision
from mnist_flow.registry.store import ModelVersion, Registry
from mnist_flow.search.scale import resolve_workers
from mnist_flow.search.watchdog import Watchdog, stage_timeout
from mnist_flow.settings import Settings, load_settings
from mnist_flow.storage.fsutil import PERMANENT_ERRNOS
from mnist_flow.summary import RunSummary
from mnist_flow.training.loop import EvalResult, select_device
from mnist_flow.training.model import MLP
from mnist_flow.training.threads import FixedThreads, Policy, bound_native_caches, policy_for
from mnist_flow.training.threads import describe as describe_threads


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what can heal: outages (network, database) and I/O errors that are not permanent.

    Bad input, corrupt data, a full disk and programming errors (TypeError, ...) will not fix themselves:
    they fail at once instead of after 22 s of retries.
    """
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except MnistFlowError:
        return False
    except OSError as exc:  # a full disk or a read-only folder stays so
        return exc.errno not in PERMANENT_ERRNOS
    except BaseException:  # noqa: BLE001 - anything else (a bug) is not retried
        return False
    return False


IO_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": _retry_transient}


@task(cache_policy=NO_CACHE, **IO_RETRIES)
def fetch_data(params: RunParams, settings: Settings) -> DataBundle:
    """Fetch (or read) and verify the dataset; the fingerprint joins the lineage."""
    bundle = pipeline.load_data(params, settings)
    get_run_logger().info(
        "data: %s from %s (%s), fingerprint %s", bundle.name, bundle.source, bundle.origin, bundle.fingerprint[:16]
    )
    return bundle


@task(cache_policy=NO_CACHE)
def split_data(bundle: DataBundle, params: RunParams, device: str) -> pipeline.Prepared:
    """Carve the stratified validation split; features go to the device once."""
    return pipeline.prepare(bundle, val_fraction=params.val_fraction, seed=params.seed, device=device)


def champion_start(params: RunParams, settings: Settings) -> list[dict[str, Any]]:
    """The current champion's parameters, queued first in a new study (new data); else nothing."""
    with Registry.from_settings(settings) as registry:
        return pipeline.champion_warm_start(registry, params.dataset)


@task(cache_policy=NO_CACHE)
def tune(
    prepared: pipeline.Prepared,
    params: RunParams,
    settings: Settings,
    run_key: str,
    warm_start: list[dict[str, Any]],
    beside: int = 0,
) -> pipeline.Tuned:
    """Run this flow run's trials of the dataset's Optuna study (a retried run resumes it).

    A new study (new data) starts from the seed configuration and ``warm_start`` (the current champion's
    parameters, :func:`champion_start`). ``beside``: trial processes running the study at the same time on this machine; the trials here then
    run single-threaded, as theirs do. After trial worker runs it only finds the run's trials done (or
    runs what they left).
    """
    threads: Policy = policy_for(settings.threads)
    if beside and not settings.threads:
        threads = FixedThreads(1, "one per trial process")
    return pipeline.tune(
        prepared,
        params,
        settings.resolved_database_url,
        run_key=run_key,
        flow_run_id=flow_run.id,
        progress=LogProgress(get_run_logger()),
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_grace=settings.heartbeat_grace,
        warm_start=warm_start,
        watchdog=Watchdog(multiple=settings.hang_multiple, min_seconds=settings.hang_min_seconds),
        threads=threads,
    )


@task(cache_policy=NO_CACHE)
def train_best(
    prepared: pipeline.Prepared, best: FrozenTrial, params: RunParams, settings: Settings
) -> pipeline.FinalFit:
    """Train the best configuration for the final number of epochs with each of ``final_seeds`` seeds at once
    and keep their ensemble, or the best by validation accuracy (guarded; see pipeline.final_fits and
    pipeline.final_fit).

    One fit: more than one intra-op thread only while measured faster (mnist_flow.training.threads).
    Several: one thread each (MNIST_FLOW_THREADS overrides), since they share the CPUs.
    """
    logger = get_run_logger()
    logger.info(
        "final fit of trial #%d (val accuracy %.4f): %s",
        best.number,
        best.value,
        pipeline.final_config(best, params).to_dict(),
    )
    threads: Policy = policy_for(settings.threads)
    if params.final_seeds > 1 and not settings.threads:
        threads = FixedThreads(1, f"one per final fit, {params.final_seeds} at once")
    fitted = pipeline.final_fits(prepared, best, params, progress=LogProgress(logger), threads=threads)
    for note in fitted.notes:
        logger.info("final fit: %s", note)
    logger.info("final fit: %s", describe_threads(threads))
    return fitted


@task(cache_policy=NO_CACHE)
def evaluate(model: MLP, prepared: pipeline.Prepared) -> EvalResult:
    """Evaluate the final model on the test set."""
    result = pipeline.evaluate_test(model, prepared)
    get_run_logger().info("test accuracy %.4f, loss %.4f", result.accuracy, result.loss)
    return result


@task(cache_policy=NO_CACHE, **IO_RETRIES)
def register(
    prepared: pipeline.Prepared,
    fitted: pipeline.FinalFit,
    test: EvalResult,
    study_name: str,
    trial_number: int,
    run_key: str,
    settings: Settings,
) -> ModelVersion:
    """Register the model with its lineage and the gate's decision, in one transaction (idempotent per run)."""
    candidate = pipeline.Candidate(
        prepared,
        fitted.model,
        fitted.config,
        fitted.history,
        test,
        study_name=study_name,
        trial_number=trial_number,
        run_key=run_key,
        flow_run_id=flow_run.id,
        ensemble=fitted.ensemble,
        val_seen=fitted.val_seen,
    )
    with Registry.from_settings(settings) as registry:
        # registered and decided together: a crash never leaves a version without its decision
        version, _ = pipeline.register_and_decide(
            registry,
            candidate,
            margin=settings.promotion_margin,
            alpha=settings.promotion_alpha,
            require_study=True,
        )
    get_run_logger().info("registered %s v%d", version.name, version.version)
    return version


@task(cache_policy=NO_CACHE)
def gate(
    prepared: pipeline.Prepared, version: ModelVersion, test: EvalResult, settings: Settings
) -> tuple[ModelVersion, Decision | None]:
    """Champion/challenger gate: the decision recorded with the version (a version without one is decided once)."""
    with Registry.from_settings(settings) as registry:
        version, decision = pipeline.decide_promotion(
            registry,
            prepared,
            version,
            test,
            flow_run_id=flow_run.id,
            margin=settings.promotion_margin,
            alpha=settings.promotion_alpha,
        )
    if decision is not None:
        get_run_logger().info("decision on v%d: %s: %s", version.version, decision.outcome, decision.reason)
    return version, decision


class CheckedFlow(Flow):
    """A flow whose parameters are checked by RunParams before Prefect creates a run (ConfigError)."""

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        RunParams.parse(**get_call_parameters(self.fn, args, kwargs))
        self.retries = 0  # a direct call (terminal, script, test) fails fast; deployment runs keep their retries
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        # deployment runs: one ConfigError message instead of a pydantic dump; RunParams is the only check
        return RunParams.parse(**parameters).flat()


def checked_flow(**options: Any) -> Any:
    """``@flow(**options)`` building a :class:`CheckedFlow`."""
    return lambda fn: CheckedFlow(fn=fn, **options)


def _timeout(
    prepared: pipeline.Prepared,
    settings: Settings,
    epochs: int,
    hidden: tuple[int, int],
    history: Any = (),
    samples: int | None = None,
) -> float:
    """A stage's timeout from its epoch budget (mnist_flow.search.watchdog.stage_timeout): a backstop for a hang.
    ``samples``: the images an epoch trains on (default: the training split)."""
    return stage_timeout(
        epochs,
        hidden,
        samples or len(prepared.splits.train_y),
        history,
        multiple=settings.hang_multiple,
        min_seconds=settings.hang_min_seconds,
    )


# retries=1 (deployment runs): a run that failed (an outage outlasting the I/O tasks' retries, a stage timeout)
# runs once more in its process, resuming its study (same run key). A crashed process is retried by the
# service's automation (flows/automations.py, `make deploy`); see docs/service.md.
@checked_flow(name="mnist", log_prints=True, retries=1, retry_delay_seconds=30)
@with_run_parameters  # one keyword per RunParams field: Prefect's parameter schema comes from it
def mnist(**parameters: Any) -> RunSummary:
    """Tune, train, evaluate and register an MLP for handwritten digits (or Fashion-MNIST)."""
    params = RunParams.parse(**parameters)
    quiet_user_error_tracebacks()  # Prefect's handlers exist now: a user error is logged as one message
    settings = load_settings()
    bound_native_caches(adaptive=not settings.threads)  # before the first matmul (oneDNN kernel caches)
    quiet_optuna()
    watch = pipeline.Stopwatch()
    device = select_device(settings.device)
    run_key = str(flow_run.id or pipeline.new_run_key())
    n_workers = resolve_workers(params.workers, params.n_trials)
    if params.trial_runner == "deployment":  # a worker deployment and storage that suits where its runs go
        check_trial_workers(n_workers, settings)
    with watch("data"):
        bundle = fetch_data(params, settings)
        prepared = split_data(bundle, params, str(device))
    with watch("tune"):
        # this process's share of the trials, or all of them where it runs trials beside trial processes (a
        # killed one breaks the whole pool, and this process then finishes the run's trials alone)
        share = params.n_trials if params.trial_runner == "local" else -(-params.n_trials // n_workers)
        tune_epochs = share * params.max_epochs
        tune_here = tune.with_options(
            timeout_seconds=_timeout(
                prepared, settings, tune_epochs, (params.space.hidden1_max, params.space.hidden2_max)
            )
        )
        warm_start = champion_start(params, settings)  # read once: every path opens the study with it
        if n_workers > 1 and params.trial_runner == "deployment":
            # trial worker runs run the study; the task below then only finds it done (or runs what they left)
            run_trial_workers(prepared, params, run_key, settings, n_workers, warm_start)
            tuned = tune_here(prepared, params, settings, run_key, warm_start)
        elif n_workers > 1:  # this process runs trials too, beside n_workers - 1 trial processes
            tuned = run_local_trial_workers(
                prepared,
                params,
                run_key,
                settings,
                n_workers,
                here=lambda: tune_here(prepared, params, settings, run_key, warm_start, beside=n_workers - 1),
                warm_start=warm_start,
            )
        else:
            tuned = tune_here(prepared, params, settings, run_key, warm_start)
        study, best = tuned.study, tuned.best
    with watch("train"):
        train_timeout = _timeout(  # the seeds' fits share the CPUs: a backstop as if they ran one after another
            prepared,
            settings,
            params.final_epochs * params.final_seeds,
            (int(best.params["hidden1"]), int(best.params["hidden2"])),
            tuned.trials,
            samples=len(pipeline.final_splits(prepared, params).train_y),  # with train+val: the validation images too
        )
        fitted = train_best.with_options(timeout_seconds=train_timeout)(prepared, best, params, settings)
    with watch("evaluate"):
        test = evaluate(fitted.model, prepared)
    with watch("register"):
        version = register(prepared, fitted, test, study.study_name, best.number, run_key, settings)
        version, decision = gate(prepared, version, test, settings)
        _ = publish_decision(decision, version, settings.resolved_database_url)  # an artifact id (sync here)
    summary = pipeline.build_summary(
        params, prepared, tuned, run_key, fitted, test, version, decision, watch.seconds, settings.resolved_database_url
    )
    get_run_logger().info("summary:\n%s", "\n".join(summary.lines()))
    publish_review(summary, study, version, settings.dashboard_url)
    return summary


#: Seconds to wait for the temporary server at least: on a busy machine it takes longer than Prefect's 20 s.
TEMPORARY_SERVER_STARTUP_S = 90


def start_temporary_server() -> None:
    """Without PREFECT_API_URL, start Prefect's temporary API now, tied to this process.

    Prefect would start the same server (a singleton) on first use and stop it at exit; started here,
    a watchdog also kills it when this process is killed (SIGKILL leaves no exit handler to run), and it
    runs in a process group of its own (:class:`_TemporaryServer`).
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    from mnist_flow.cli.flow import tie_to_this_process
    from mnist_flow.errors import ConfigError

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    _check_prefect_home()
    server = _temporary_server_class()()
    timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), TEMPORARY_SERVER_STARTUP_S)
    try:
        server.start(timeout=timeout)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"Prefect's temporary API server did not start: {str(exc).splitlines()[0][:200]}",
            fix="Run a server (`make server`) and set PREFECT_API_URL, or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine.",
        ) from None
    if server.server_process is not None:
        tie_to_this_process(server.server_process.pid)


def _check_prefect_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME: made here if missing. A home that cannot be a
    folder is the user's to fix; left to the server, it failed after its start-up timeout with a database
    traceback and a message blaming the machine's load."""
    from prefect.settings import get_current_settings

    from mnist_flow.errors import ConfigError

    home = Path(get_current_settings().home).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        if not os.access(home, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(
            f"PREFECT_HOME ({home}) cannot hold the temporary Prefect server's database: {exc.strerror or exc}.",
            fix="Point PREFECT_HOME at a writable folder (or unset it: ~/.prefect), or set PREFECT_API_URL "
            "to a running server.",
        ) from None


def _temporary_server_class() -> type:
    """Prefect's temporary server, started in a process group of its own.

    Ctrl-C at a terminal sends SIGINT to the whole foreground process group. Uvicorn handles it by
    shutting the server down at once, so the flow, interrupted at the same moment, found no API to
    record its end: Prefect's crash handler failed with a ConnectError traceback and the script exited
    1 after about 80 s of retries (measured: /work/notes/ctrlc.py). Out of the terminal's group, the
    server stays up until Prefect stops it at exit (or the watchdog, if this process is killed).
    The subclass is Prefect's singleton: ``SubprocessASGIServer()`` elsewhere returns this instance.
    """
    import functools
    import subprocess
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer

    class _TemporaryServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            own_group = functools.partial(subprocess.Popen, process_group=0)
            with mock.patch.object(subprocess, "Popen", own_group):
                return super()._run_uvicorn_command()

    return _TemporaryServer


def main(argv: list[str] | None = None) -> int:
    """`python flows/mnist.py [--param value ...]`: validate, run the flow, print the summary."""
    from mnist_flow.cli.flow import run_flow_cli

    return run_flow_cli(mnist, argv, before_run=start_temporary_server)


if __name__ == "__main__":
    from mnist_flow.cli.process import exit_process

    exit_process(main())
