"""One temporary Prefect API for all flow tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
