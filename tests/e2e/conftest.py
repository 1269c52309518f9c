"""Fixtures of the end-to-end tests: a token to find stray processes (databases: tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # procs.py, shared with the scale-out tests

import procs


@pytest.fixture
def e2e_token() -> Iterator[str]:
    """A token in every started process's environment; the test fails if any such process outlives it."""
    token = procs.new_token()
    yield token
    stray = procs.kill_leftovers(token)
    assert not stray, f"processes left running after the test (killed now): {stray}"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    """One Prefect server with `make deploy` done, shared by a module's service tests (service_helpers.py)."""
    from service_helpers import service

    token = procs.new_token()
    with service(tmp_path_factory.mktemp("service"), token) as running:
        yield running
    stray = procs.kill_leftovers(token)
    assert not stray, f"processes left running after the tests (killed now): {stray}"


@pytest.fixture
def workers(svc):
    """The module's service; the workers a test starts are stopped at its end (the next test starts its own)."""
    from service_helpers import wait_for_flow_run_processes

    yield svc
    for worker in svc.workers:
        worker.stop()
    svc.workers.clear()
    # A flow-run process runs in its own session (the worker's stop does not end it): the next test, or the
    # module's check for strays, waits for it to end as it should once its run is final.
    lingering = wait_for_flow_run_processes(svc.token)
    if lingering:  # the test failed mid-run: end its processes and runs so the module's next test starts clean
        for pid in lingering:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        svc.cancel_unfinished()
    assert not lingering, f"flow-run processes still running 60 s after the test: {lingering}"
