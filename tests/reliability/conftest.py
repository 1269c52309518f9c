"""Fixtures of the reliability tests, and the recorder behind docs/reliability.md.

Each test calls ``reliability.record(case, expected, observed)``; at the end of the session the
records (with the test's outcome and duration) are merged into ``test-output/reliability.json``,
which ``scripts/reliability_table.py`` renders as the table in docs/reliability.md.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rel_helpers import REPO
from testlib import pg_admin

REPORT = REPO / "test-output" / "reliability.json"

_records: dict[str, list[dict]] = {}
_outcomes: dict[str, dict] = {}


@dataclass
class Recorder:
    """Collects the (case, expected, observed) rows of one test."""

    nodeid: str
    rows: list[dict] = field(default_factory=list)

    def record(self, case: str, expected: str, observed: str, *, group: str | None = None) -> None:
        self.rows.append({"case": case, "expected": expected, "observed": observed, "group": group})


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """Record what a reliability test injected, what should happen and what did happen."""
    recorder = Recorder(request.node.nodeid)
    yield recorder
    _records[request.node.nodeid] = recorder.rows


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    entry = _outcomes.setdefault(item.nodeid, {"outcome": "passed", "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 2)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and report.when in ("setup", "call"):
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _records:
        return
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    # Each worker of `pytest -n 2` merges its own records: one at a time, under an exclusive lock.
    with (REPORT.parent / "reliability.json.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            existing = json.loads(REPORT.read_text())["tests"]
        except (OSError, ValueError, KeyError):
            existing = {}
        for nodeid, rows in _records.items():
            existing[nodeid] = {**_outcomes.get(nodeid, {"outcome": "unknown", "seconds": None}), "rows": rows}
        partial = REPORT.with_suffix(".json.partial")
        partial.write_text(json.dumps({"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "tests": existing},
                                      indent=2))
        partial.replace(REPORT)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An MNIST_FLOW_HOME that does not exist yet."""
    return tmp_path / "home"


def pg_connect():
    """An autocommit admin connection to 127.0.0.1:5432."""
    return pg_admin()


