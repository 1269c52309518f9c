"""Where several trial workers may run: SQLite and local artifacts only on one machine; CPU shares."""

from __future__ import annotations

import os

import pytest

from mnist_flow.errors import ConfigError
from mnist_flow.search.scale import check_shared_state, leaves_this_machine, threads_per_worker

SQLITE = "sqlite:////tmp/x/mnist-flow.db"
POSTGRES = "postgresql+psycopg://mnist:s3cret@db.internal:5432/mnist"


def test_one_machine_with_a_few_workers_may_use_sqlite_and_a_local_folder() -> None:
    check_shared_state(SQLITE, "/tmp/x/artifacts", workers=4, multi_host=False, pool_type="process")
    check_shared_state(SQLITE, "/tmp/x/artifacts", workers=1, multi_host=True, pool_type="kubernetes")


@pytest.mark.parametrize("multi_host, pool_type", [(True, "process"), (False, "kubernetes"), (False, "docker")])
def test_several_machines_refuse_sqlite_with_the_postgresql_fix(multi_host: bool, pool_type: str) -> None:
    with pytest.raises(ConfigError, match="SQLite") as info:
        check_shared_state(SQLITE, "s3://bucket/artifacts", workers=2, multi_host=multi_host, pool_type=pool_type)
    assert "postgresql+psycopg://" in info.value.fix and "MNIST_FLOW_ARTIFACTS_URL" in info.value.fix


def test_several_machines_refuse_artifacts_on_this_machines_disk_but_accept_a_declared_shared_mount() -> None:
    with pytest.raises(ConfigError, match="this machine's disk"):
        check_shared_state(POSTGRES, "/home/me/.mnist-flow/artifacts", workers=2, multi_host=True)
    check_shared_state(POSTGRES, "file:///mnt/shared/artifacts", workers=2, multi_host=True)
    check_shared_state(POSTGRES, "s3://bucket/mnist-flow", workers=8, multi_host=False, pool_type="kubernetes")


def test_the_refusal_never_shows_the_database_password() -> None:
    with pytest.raises(ConfigError) as info:
        check_shared_state("sqlite:////tmp/x.db", "/tmp/a", workers=2, multi_host=True)
    assert "s3cret" not in str(info.value)


def test_a_process_pool_stays_on_this_machine_unless_multi_host_says_otherwise() -> None:
    assert not leaves_this_machine(multi_host=False, pool_type="process")
    assert not leaves_this_machine(multi_host=False, pool_type=None)
    assert leaves_this_machine(multi_host=True, pool_type="process")
    assert leaves_this_machine(multi_host=False, pool_type="kubernetes")


@pytest.mark.parametrize("workers, cpus, expected", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5)])
def test_each_trial_process_on_one_machine_gets_its_share_of_the_cpus(workers: int, cpus: int,
                                                                       expected: int) -> None:
    assert threads_per_worker(workers, cpus) == expected


def test_multi_host_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnist_flow.settings import load_settings

    monkeypatch.setenv("MNIST_FLOW_MULTI_HOST", "true")
    assert load_settings().multi_host is True


def test_available_cpus_respects_the_affinity_mask_and_a_cgroup_v2_quota(tmp_path) -> None:
    from mnist_flow.search.scale import _own_cgroup, available_cpus, cgroup_cpu_quota

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == affinity  # no cpu.max anywhere: the affinity mask
    own = (_own_cgroup() or "/").lstrip("/")
    leaf = tmp_path / own
    leaf.mkdir(parents=True, exist_ok=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) is None and available_cpus(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5, on the root
    assert cgroup_cpu_quota(str(tmp_path)) == 1.5
    assert available_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still leaves one process
    assert available_cpus(str(tmp_path)) == 1


@pytest.mark.parametrize("workers, n_trials, cpus, memory_gib, expected", [
    ("auto", 20, 2, 24, 2), ("auto", 20, 16, 24, 16), ("auto", 3, 16, 24, 3), ("auto", 20, 16, 4, 2),
    ("auto", 20, 1, 24, 1), ("auto", 20, 8, 1, 1), (3, 20, 2, 24, 3), (1, 20, 16, 24, 1)])
def test_workers_auto_is_one_process_per_cpu_within_the_trials_and_the_memory(
        workers, n_trials: int, cpus: int, memory_gib: int, expected: int) -> None:
    from mnist_flow.search.scale import resolve_workers

    assert resolve_workers(workers, n_trials, cpus=cpus, memory=memory_gib * 2**30) == expected


def test_the_run_parameters_take_auto_or_a_number_of_workers() -> None:
    from mnist_flow.errors import ConfigError
    from mnist_flow.params import RunParams

    assert RunParams.parse().workers == "auto" and RunParams.parse().trial_runner == "local"
    assert RunParams.parse(workers="3").workers == 3 and RunParams.parse(workers=1).workers == 1
    for bad in (0, "many", -2):
        with pytest.raises(ConfigError, match="workers"):
            RunParams.parse(workers=bad)
