"""The `mnist-trials` flow: one trial worker of a `mnist` run with ``workers > 1``.

The `mnist` flow starts ``workers`` runs of the deployment `mnist-trials/worker` (same work pool,
`mnist`) with ``run_deployment``, waits for them, then trains, evaluates and registers as usual. Any
free Prefect worker, on any machine, picks one up. Each run loads the data itself (same parameters;
the study name, which carries the data fingerprint, must match), then runs trials of the shared
study until the run's ``n_trials`` are finished (see :mod:`mnist_flow.search.budget`). Each trial records
its process (``worker`` = host:pid) and this flow run's id (``flow_run_id``).

Not meant to be started by hand: `prefect deployment run mnist/train --param workers=2` does it.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run

from mnist_flow import pipeline
from mnist_flow.errors import ConfigError, quiet_user_error_tracebacks
from mnist_flow.params import RunParams
from mnist_flow.progress import LogProgress, quiet_optuna
from mnist_flow.search.scale import check_shared_state
from mnist_flow.search.study import study_name_for, worker_id
from mnist_flow.search.watchdog import Watchdog
from mnist_flow.settings import Settings, load_settings
from mnist_flow.storage.db import dispose_storage, mask_url
from mnist_flow.training.loop import select_device
from mnist_flow.training.threads import (
    AdaptiveThreads,
    FixedThreads,
    Policy,
    bound_native_caches,
    child_environment,
    describe,
    single_threaded_process,
)

T = TypeVar("T")

WORKER_DEPLOYMENT = "mnist-trials/worker"
#: How long the parent waits for a Prefect worker to pick its trial runs up before giving up.
PICKUP_TIMEOUT_S = 600
POLL_S = 2.0
#: Exit status of a trial process whose parent (the flow-run process) is gone.
PARENT_GONE_EXIT_CODE = 70

NO_DEPLOYMENT_FIX = (
    "Run the flow as a deployment on a Prefect server with workers on its pool: `make server`, "
    "`make deploy`, then `make worker` once per trial worker (see docs/scale-out.md); "
    "or pass workers=1 to run the trials in the flow's own process."
)


@flow(name="mnist-trials", log_prints=True)
def mnist_trials(params: dict[str, Any], run_key: str, study_name: str, worker_index: int = 1) -> dict[str, Any]:
    """Run trials of the run ``run_key`` in the shared study until its ``n_trials`` are finished."""
    settings = load_settings()
    # On one machine the trial processes share the CPUs: one thread each. On many, each has its machine's
    # and the adaptive policy measures whether more than one thread pays there.
    if settings.multi_host and not settings.threads:
        bound_native_caches(adaptive=True)
        policy: Policy = AdaptiveThreads.for_cpus()
    else:
        single_threaded_process(settings.threads)
        policy = FixedThreads(settings.threads) if settings.threads else FixedThreads(1, "one per trial process")
    return run_trials_here(params, run_key, study_name, worker_index, settings, policy, flow_run_id=flow_run.id)


@task(name="trial-process", cache_policy=NO_CACHE)
def trial_process(
    params: dict[str, Any], run_key: str, study_name: str, worker_index: int, settings: Settings
) -> dict[str, Any]:
    """One trial process of a local ``workers > 1`` run (Prefect's ProcessPoolTaskRunner runs it).

    Ctrl-C ends it with a result, not the interrupt: its trial is recorded FAIL with the reason, and the
    parent, interrupted too, ends the run. (An interrupt returned through the pool escapes Prefect's
    result callback, which catches ``Exception`` only, as a thread traceback in the parent.)
    """
    quiet_user_error_tracebacks()  # Optuna's log of the interrupted trial: no traceback here either
    single_threaded_process(settings.threads)
    policy = FixedThreads(settings.threads) if settings.threads else FixedThreads(1, "one per trial process")
    interrupted = {"worker": worker_id(), "flow_run_id": str(flow_run.id), "trials": [], "interrupted": True}
    armed = True

    def interrupt_once(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if armed:
            raise KeyboardInterrupt

    # Only here does SIGINT raise: anywhere else in Prefect's code an interrupt would escape its result
    # callback (see above), so outside this block it is only noted (_note_interrupt). Swapping the handler
    # returns the one it replaces in the same step: SIG_IGN there means a SIGINT came while it started.
    try:
        if signal.signal(signal.SIGINT, interrupt_once) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return interrupted
        return run_trials_here(params, run_key, study_name, worker_index, settings, policy, flow_run_id=flow_run.id)
    except KeyboardInterrupt:
        return interrupted
    finally:
        armed = False  # from here on a SIGINT is only noted (interrupt_once ignores it, then SIGINT is ignored)
        if not _interrupted_already():
            signal.signal(signal.SIGINT, _note_interrupt)


def run_trials_here(
    params: dict[str, Any],
    run_key: str,
    study_name: str,
    worker_index: int,
    settings: Settings,
    threads: Policy,
    *,
    flow_run_id: Any = None,
) -> dict[str, Any]:
    """Load the data, check it is the study's, run trials of ``run_key`` until its ``n_trials`` are finished.

    The body of both kinds of trial worker: a run of the deployment `mnist-trials/worker` and a task of
    a local process pool. ``params`` is the parent's :class:`RunParams` as JSON (``workers`` resolved).
    """
    run_params = RunParams.parse(**params)
    logger = get_run_logger()
    quiet_optuna()
    bundle = pipeline.load_data(run_params, settings)
    if study_name_for(bundle.name, bundle.fingerprint) != study_name:
        raise ConfigError(
            f"This worker's data ({bundle.name}, fingerprint {bundle.fingerprint[:12]}) is not the "
            f"data of the study {study_name!r}.",
            fix="Give every worker the same dataset files as the flow (same source and data_dir).",
        )
    prepared = _for_trials(
        pipeline.prepare(
            bundle, val_fraction=run_params.val_fraction, seed=run_params.seed, device=select_device(settings.device)
        )
    )
    del bundle
    url = settings.resolved_database_url
    storage = pipeline.study_storage(
        url, heartbeat_interval=settings.heartbeat_interval, heartbeat_grace=settings.heartbeat_grace
    )
    try:
        try:
            storage.get_study_id_from_name(study_name)
        except KeyError:
            raise ConfigError(
                f"The study {study_name!r} is not in this worker's database ({mask_url(url)}).",
                fix="Point MNIST_FLOW_DATABASE_URL of every worker to the flow's study database.",
            ) from None
        logger.info(
            "trial worker %d of %s (%s, %s) on run %s",
            worker_index,
            run_params.workers,
            worker_id(),
            describe(threads),
            run_key,
        )
        tuned = pipeline.tune(
            prepared,
            run_params,
            url,
            run_key=run_key,
            flow_run_id=flow_run_id,
            storage=storage,
            worker_index=worker_index,
            progress=LogProgress(logger),
            threads=threads,
            watchdog=Watchdog(multiple=settings.hang_multiple, min_seconds=settings.hang_min_seconds),
        )
        mine = [
            t.number
            for t in tuned.trials
            if t.user_attrs.get("run_key") == run_key and t.user_attrs.get("worker") == worker_id()
        ]
    finally:
        dispose_storage(storage)
    logger.info("trial worker %d ran trial(s) %s", worker_index, mine)
    return {"worker": worker_id(), "flow_run_id": str(flow_run_id), "trials": mine}


def _for_trials(prepared: pipeline.Prepared) -> pipeline.Prepared:
    """Only what trials read: the splits, the dataset's name and fingerprint. The raw images and the test
    set (about 90 MB of Fashion-MNIST) are let go, so each trial process holds one copy of the data."""
    from dataclasses import replace

    def none(t: Any) -> Any:  # an empty tensor of the same kind (a [:0] view would keep the storage)
        return t.new_empty((0, *t.shape[1:]))

    b = prepared.bundle
    bundle = replace(
        b,
        train_images=none(b.train_images),
        train_labels=none(b.train_labels),
        test_images=none(b.test_images),
        test_labels=none(b.test_labels),
    )
    return replace(prepared, bundle=bundle, test_x=none(prepared.test_x), test_y=none(prepared.test_y))


# --- the parent's side (called by the `mnist` flow) ---------------------------------------------------------------


def check_trial_workers(workers: int, settings: Settings) -> None:
    """Before any work: the worker deployment exists, and the storage suits where its runs may go."""
    if workers <= 1:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(WORKER_DEPLOYMENT)
        except ObjectNotFound:
            raise ConfigError(
                f"workers={workers} needs the deployment {WORKER_DEPLOYMENT!r}, and this Prefect API "
                "has none (a flow run without PREFECT_API_URL uses a temporary API without "
                "deployments or workers).",
                fix=NO_DEPLOYMENT_FIX,
            ) from None
        pool = client.read_work_pool(deployment.work_pool_name) if deployment.work_pool_name else None
    check_shared_state(
        settings.resolved_database_url,
        settings.resolved_artifacts_url,
        workers=workers,
        multi_host=settings.multi_host,
        pool_type=pool.type if pool else None,
    )
    if pool is not None and pool.concurrency_limit is not None and pool.concurrency_limit < workers:
        raise ConfigError(
            f"The work pool {pool.name!r} runs at most {pool.concurrency_limit} flow run(s) at once, "
            f"fewer than workers={workers}.",
            fix=f"Raise it (prefect work-pool set-concurrency-limit {pool.name} N) or lower workers.",
        )


def run_trial_workers(
    prepared: pipeline.Prepared,
    params: RunParams,
    run_key: str,
    settings: Settings,
    workers: int,
    warm_start: Sequence[dict[str, Any]] = (),
) -> list[Any]:
    """Start ``workers`` runs of the worker deployment on the run's study and wait for them.

    Returns their final flow runs. Fails if none of them completed; a worker that failed while others
    completed costs only its unfinished trial, which the others (or the parent) run again.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    storage = pipeline.study_storage(
        settings.resolved_database_url,
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_grace=settings.heartbeat_grace,
    )
    try:
        # the workers find it there, with its seed trial and the champion's parameters (``warm_start``) queued
        study = pipeline.open_run_study(prepared, params, storage, warm_start=warm_start)
    finally:
        dispose_storage(storage)
    parameters = {
        "params": params.model_copy(update={"workers": workers}).flat(),
        "run_key": run_key,
        "study_name": study.study_name,
    }
    runs = [
        run_deployment(
            WORKER_DEPLOYMENT,
            parameters={**parameters, "worker_index": index},
            timeout=0,
            flow_run_name=f"trials-{run_key[:8]}-{index}",
            idempotency_key=f"{run_key}:trials:{index}",
        )
        for index in range(1, workers + 1)
    ]
    logger.info(
        "started %d trial worker run(s) of %s: %s",
        len(runs),
        WORKER_DEPLOYMENT,
        ", ".join(cast(FlowRun, r).name for r in runs),
    )
    final = _wait_for(runs)
    completed = [r for r in final if r.state and r.state.is_completed()]
    for run in final:
        if run not in completed:
            logger.warning(
                "trial worker run %s ended %s: %s",
                run.name,
                run.state.name if run.state else "?",
                run.state.message if run.state else "",
            )
    if not completed:
        first = final[0].state
        raise RuntimeError(
            f"No trial worker run completed; {final[0].name} ended "
            f"{first.name if first else '?'}: {first.message if first else ''}"
        )
    return final


def run_local_trial_workers(
    prepared: pipeline.Prepared,
    params: RunParams,
    run_key: str,
    settings: Settings,
    workers: int,
    here: Callable[[], T],
    warm_start: Sequence[dict[str, Any]] = (),
) -> T:
    """Run the run's trials in this process and ``workers - 1`` single-threaded processes; wait for them.

    ``here`` is this process's share, run while the others run: the flow's own tune task, one thread.
    This process has its data and libraries loaded already; a trial process spends about 5 s starting
    (spawned, it imports torch and Prefect, then loads the data from the cache or folder the flow read,
    so only a few parameters are pickled). Prefect's ``ProcessPoolTaskRunner`` starts the processes and
    runs one :func:`trial_process` task in each; their trial logs reach this flow run. Together they
    finish exactly ``n_trials`` (mnist_flow.search.budget): ``here`` returns once they are finished.
    A process that crashed (a kill breaks the whole pool) costs only the trials that were running:
    they are failed once their heartbeat is stale and ``here`` runs them again (their configurations first).

    Returns what ``here`` returned.
    """
    from prefect.task_runners import ProcessPoolTaskRunner

    logger = get_run_logger()
    storage = pipeline.study_storage(
        settings.resolved_database_url,
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_grace=settings.heartbeat_grace,
    )
    try:
        # the processes find it there, with its seed trial and the champion's parameters (``warm_start``) queued
        study = pipeline.open_run_study(prepared, params, storage, warm_start=warm_start)
    finally:
        dispose_storage(storage)
    payload = params.model_copy(update={"workers": workers}).flat()
    logger.info(
        "running the trials in this process and %d more single-threaded process(es) (ProcessPoolTaskRunner)",
        workers - 1,
    )
    with (
        _InterruptForwarder() as interrupts,  # (exits last: after the pool has shut down)
        _shared_api(),
        child_environment(settings.threads),
        ProcessPoolTaskRunner(
            max_workers=workers - 1, initializer=_pool_process, initargs=(settings.threads,)
        ) as runner,
    ):
        try:
            with _sigint_held():  # the processes start with SIGINT held, until their initializer handles it
                futures = [
                    runner.submit(
                        trial_process,
                        {
                            "params": payload,
                            "run_key": run_key,
                            "study_name": study.study_name,
                            "worker_index": index,
                            "settings": settings,
                        },
                    )
                    for index in range(1, workers)
                ]
            result = here()
            outcomes = [_outcome(future) for future in futures]
        except BaseException:
            # Ctrl-C, or this process's share failed: the trial processes are interrupted too (their running
            # trials are recorded FAIL), so that the pool's shutdown does not wait for their whole run of trials
            interrupts.start()
            raise
    for index, (state, error) in enumerate(outcomes, 1):
        if state is not None and state.is_completed():
            continue
        # a crash (a killed process breaks the whole pool) or an error of its own: ``here`` has finished the
        # run's trials all the same (those it left running were failed and run again), so the run goes on
        logger.warning("trial process %d ended %s: %s", index, state.name if state is not None else "broken", error)
    return result


def _pool_process(threads: int | None) -> None:
    """The initializer of each trial process: single-threaded, interrupted once, and it ends with its parent.

    Ctrl-C interrupts a trial process once (a terminal's SIGINT reaches it, and the parent forwards its
    own): inside :func:`trial_process` the running trial is recorded FAIL with its reason; elsewhere the
    interrupt is only noted (:func:`_note_interrupt`) and the task returns at once; later SIGINTs are
    ignored, so that they cannot break the recording. The process starts with SIGINT held
    (:func:`_sigint_held`) until this initializer has set that up. A pool process outlives a parent
    killed with SIGKILL: it would finish its trial for a run that was crashed, then wait on the pool's
    queue forever. A daemon thread waits on the parent's sentinel (multiprocessing's own handle, ready
    when the parent is gone) and ends the process at once; its running trial's heartbeat stops, and the
    resumed run fails and retries it.
    """

    single_threaded_process(threads)
    signal.signal(signal.SIGINT, _note_interrupt)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one that came while it started is noted now
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def exit_with_parent() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(PARENT_GONE_EXIT_CODE)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def _note_interrupt(signum: int, frame: Any) -> None:
    """A trial process's SIGINT outside its trials: noted (SIGINT ignored from then on), nothing raised."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted_already() -> bool:
    """In a trial process: whether it took its one SIGINT already (it ignores SIGINT from then on)."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT in this thread while it starts the pool's threads, which start its processes.

    A blocked signal stays blocked in the threads started meanwhile and in the processes they start
    (the mask is inherited and kept across exec); SIGINT then waits in a starting trial process until
    its initializer handles it, instead of ending it with a traceback mid-import. A SIGINT that came
    here meanwhile is raised when this block ends.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _InterruptForwarder:
    """Once started, SIGINT to this process's pool processes every quarter second until the block ends.

    For `kill -INT` of this process alone, and for a trial process that was not started yet when a
    terminal's Ctrl-C came: without it, the pool's shutdown would wait for their whole run of trials.
    Each takes the first SIGINT only and ignores the rest (:func:`_pool_process`).
    """

    #: A pool process still alive this long after the first SIGINT is killed, so that the interrupted run
    #: ends: its trial was recorded FAIL when it took the SIGINT (or it is stuck, and is failed by its
    #: stale heartbeat on the next run). The pool's shutdown would otherwise wait on it forever.
    KILL_AFTER_S = 20.0

    def __init__(self, every: float = 0.25) -> None:
        self._every, self._stop = every, threading.Event()

    def __enter__(self) -> _InterruptForwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def start(self) -> None:
        threading.Thread(target=self._run, name="interrupt-trials", daemon=True).start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.KILL_AFTER_S
        while True:
            signum = signal.SIGINT if time.monotonic() < deadline else signal.SIGKILL
            for child in multiprocessing.active_children():
                if child.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)
            if self._stop.wait(self._every):
                return


def _outcome(future: Any) -> tuple[Any, BaseException | None]:
    """A trial process's final state and error (a broken pool raises instead of giving a state)."""
    try:
        future.wait()
        state = future.state
    except Exception as exc:  # noqa: BLE001 - a broken pool raises whatever killed it; the caller reports it
        return None, exc
    if state.is_completed():
        return state, None
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the trial's own error, handed to the caller as data
        return state, exc
    return state, None


def _shared_api() -> Any:
    """The processes use this flow run's API: a local run's temporary server is named in the settings that
    Prefect hands to them (else each would start a temporary server of its own, 10-20 s and ~200 MB each)."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary server (Prefect keeps a single instance)
    if not server.running:
        return nullcontext()
    return temporary_settings({PREFECT_API_URL: server.api_url})


def _wait_for(runs: list[Any]) -> list[Any]:
    """Poll the flow runs until all are final; cancel them if no worker picks them up in time."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(r.id) for r in runs]
            if all(r.state and r.state.is_final() for r in current):
                return current
            waiting = all(r.state and (r.state.is_scheduled() or r.state.is_pending()) for r in current)
            if waiting and time.monotonic() - started > PICKUP_TIMEOUT_S:
                for run in current:
                    client.set_flow_run_state(run.id, Cancelled(message="no worker picked it up"), force=True)
                raise ConfigError(
                    f"No Prefect worker picked up the trial runs in {PICKUP_TIMEOUT_S} s.",
                    fix="Start workers on the deployment's pool (`make worker`).",
                )
            time.sleep(POLL_S)
