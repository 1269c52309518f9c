"""Storage that cannot keep a promise: volatile or read-only artifact stores, a full disk, a read-only folder,
and registry rows that point outside the artifact root (issue 15, class 4). Disks are real: a small tmpfs
filled up, a read-only bind mount; nothing is mocked."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rel_helpers import FAST_TUNE, clean_env, flow_script, written_files

from mnist_flow.cli import main as cli_main
from mnist_flow.errors import ArtifactIntegrityError, StorageError
from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.training.model import MLP


def _register(reg: Registry, key: str = "k"):
    torch.manual_seed(0)
    return reg.register("mnist", MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                        metrics={"test_accuracy": 0.9}, lineage=Lineage("mnist", "fp"),
                        idempotency_key=key)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled to the last page: any write of data fails with ENOSPC."""
    mount = tmp_path / "full"
    mount.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount))
    try:
        (mount / "artifacts").mkdir()
        try:
            with open(mount / "filler", "wb") as handle:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        yield mount
    finally:
        _umount(mount)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder (with one file in it) bind-mounted read-only onto itself: writes fail with EROFS, even for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "README").write_text("read-only\n")
    _mount("--bind", str(folder), str(folder))
    try:
        _mount("-o", "remount,ro,bind", str(folder))
        yield folder
    finally:
        _umount(folder)


@pytest.mark.parametrize("url", ["memory://mnist-flow/artifacts", "http://127.0.0.1:9/artifacts"])
def test_an_artifact_store_that_cannot_keep_files_is_refused_before_any_work(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        reliability) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    monkeypatch.setenv("MNIST_FLOW_ARTIFACTS_URL", url)
    code = cli_main(["tune", "--source", "sample", "--n-trials", "1"])
    _, err = capsys.readouterr()
    assert code == 2 and "MNIST_FLOW_ARTIFACTS_URL" in err and "Traceback" not in err
    assert written_files(home) == []  # refused when the settings are read: no data, no study, no trial
    reliability.record(f"MNIST_FLOW_ARTIFACTS_URL={url} (`mnist-flow tune`)",
                       "refused before any work: the store cannot keep a registered model's files",
                       err.splitlines()[0][:140], group="bad input")


@pytest.mark.slow
def test_the_flow_refuses_a_memory_artifact_store_before_it_starts(tmp_path: Path, reliability) -> None:
    home = tmp_path / "home"
    env = clean_env(home, MNIST_FLOW_ARTIFACTS_URL="memory://artifacts", PREFECT_HOME=str(tmp_path / "prefect"))
    done = flow_script([*FAST_TUNE, "--n-trials", "1"], env, timeout=180)
    assert done.returncode == 2 and "memory" in done.stderr and "MNIST_FLOW_ARTIFACTS_URL" in done.stderr
    assert written_files(home) == []
    reliability.record("MNIST_FLOW_ARTIFACTS_URL=memory://artifacts, `python flows/mnist.py`",
                       "exit 2 before any work, nothing written", "exit 2, 0 files in the home", group="bad input")


def test_artifacts_on_a_full_disk_end_in_one_storage_error_at_once(full_disk: Path, tmp_path: Path,
                                                                   reliability) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'mnist-flow.db'}", str(full_disk / "artifacts"))
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        _register(reg)
    took = time.monotonic() - start
    text = str(caught.value)
    assert "no space left" in text and str(full_disk) in text and "MNIST_FLOW_ARTIFACTS_URL" in text
    assert reg.list_versions() == []  # nothing registered without its files
    assert [p.name for p in (full_disk / "artifacts").rglob("*") if p.is_file()] == []  # no temp file left
    reg.dispose()
    reliability.record("model artifacts written to a full disk (a 1 MiB tmpfs filled up)",
                       "one StorageError naming the folder and the fix, no retries, nothing registered",
                       f"after {took:.2f} s: {text.splitlines()[0][:110]}", group="faults")


def test_the_database_on_a_full_disk_ends_in_one_storage_error(full_disk: Path, tmp_path: Path,
                                                              reliability) -> None:
    path = full_disk / "mnist-flow.db"
    (full_disk / "filler").unlink()
    reg = Registry(f"sqlite:///{path}", str(tmp_path / "artifacts"))
    reg.migrate()  # the database exists; then the disk fills up
    with open(full_disk / "filler", "wb") as handle, pytest.raises(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        for i in range(200):  # SQLite keeps some free pages: registrations go on until the file must grow
            _register(reg, key=f"k{i}")
    took = time.monotonic() - start
    reg.dispose()
    text = str(caught.value)
    assert "disk is full" in text and "MNIST_FLOW_DATABASE_URL" in text
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reliability.record("SQLite database on a disk that fills up during registrations",
                       "one StorageError (disk full), the database stays intact",
                       f"{text.splitlines()[0][:110]} ({took:.1f} s for all attempts)", group="faults")


def test_artifacts_in_a_read_only_folder_end_in_one_storage_error(read_only_folder: Path, tmp_path: Path,
                                                                  reliability) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'mnist-flow.db'}", str(read_only_folder / "artifacts"))
    with pytest.raises(StorageError) as caught:
        _register(reg)
    text = str(caught.value)
    assert "read-only" in text and str(read_only_folder) in text
    assert reg.list_versions() == []
    reg.dispose()
    reliability.record("model artifacts written to a read-only folder (read-only bind mount)",
                       "one StorageError naming the folder and the fix, nothing registered",
                       text.splitlines()[0][:120], group="faults")


def test_a_database_in_a_read_only_folder_ends_in_one_storage_error(read_only_folder: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture,
                                                                    reliability) -> None:
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", f"sqlite:///{read_only_folder / 'new' / 'mnist-flow.db'}")
    code = cli_main(["tune", "--source", "sample", "--n-trials", "1", "--max-epochs", "1"])
    _, err = capsys.readouterr()
    message = err[err.find("error: "):]
    assert code == 2 and "read-only" in message and "Traceback" not in err
    assert len(message.strip().splitlines()) == 2
    reliability.record("MNIST_FLOW_DATABASE_URL in a read-only folder, `mnist-flow tune`",
                       "one StorageError, exit 2, no traceback", message.splitlines()[0][:120], group="faults")


def test_the_flow_does_not_retry_a_full_disk(full_disk: Path, tmp_path: Path, reliability) -> None:
    """The register task's retry condition, given the states a full disk produces (StorageError, raw ENOSPC)."""
    from prefect.states import Failed

    from flows import mnist as flow_module

    reg = Registry(f"sqlite:///{tmp_path / 'mnist-flow.db'}", str(full_disk / "artifacts"))
    with pytest.raises(StorageError) as caught:
        _register(reg)
    reg.dispose()
    try:
        with open(full_disk / "more", "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
        raw = None
    except OSError as exc:
        raw = exc
    assert raw is not None and raw.errno == errno.ENOSPC
    retried = [flow_module._retry_transient(None, None, Failed(data=exc)) for exc in (caught.value, raw)]
    assert retried == [False, False]
    assert flow_module._retry_transient(None, None, Failed(data=ConnectionResetError(errno.ECONNRESET, "reset")))
    reliability.record("a full disk in the flow's register task (StorageError, and a raw ENOSPC OSError)",
                       "not retried (fails at once instead of after 2 + 5 + 15 s of retries)",
                       "retry condition: False, False (a connection reset: True)", group="faults")


def test_a_registry_row_pointing_outside_the_artifact_root_is_refused(tmp_path: Path, reliability) -> None:
    url = f"sqlite:///{tmp_path / 'mnist-flow.db'}"
    root = tmp_path / "artifacts"
    with Registry(url, str(root)) as reg:
        version = _register(reg)
    inside = Path(version.artifact_uri.removeprefix("file://"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("model.safetensors", "model.json"):
        (outside / name).write_bytes((inside.parent / name).read_bytes())  # same bytes: the checksum matches
    link = root / "mnist" / "link"
    link.symlink_to(outside, target_is_directory=True)
    targets = {"another folder": f"file://{outside}/model.safetensors",
               "'..' out of the root": f"file://{root}/mnist/../../elsewhere/model.safetensors",
               "a symlink out of the root": f"file://{link}/model.safetensors",
               "another filesystem": "memory://artifacts/mnist/model.safetensors"}
    refused = []
    for what, uri in targets.items():
        with sqlite3.connect(tmp_path / "mnist-flow.db") as con:
            con.execute("UPDATE mnist_flow_model_versions SET artifact_uri = ?", (uri,))
        with Registry(url, str(root)) as reg, pytest.raises(ArtifactIntegrityError) as caught:
            reg.load("mnist", 1)
        assert "outside the artifact root" in str(caught.value)
        refused.append(what)
    reliability.record("registry row edited to point outside the artifact root (another folder, '..', a symlink, "
                       "another filesystem), with matching checksums",
                       "refused when loaded, before anything is read", f"{len(refused)}/4 refused",
                       group="security")


@pytest.mark.slow
def test_a_flow_run_whose_artifacts_disk_is_full_fails_once_with_one_message(full_disk: Path, tmp_path: Path,
                                                                            reliability) -> None:
    home = tmp_path / "home"
    env = clean_env(home, MNIST_FLOW_ARTIFACTS_URL=str(full_disk / "artifacts"),
                    PREFECT_HOME=str(tmp_path / "prefect"))
    start = time.monotonic()
    done = flow_script([*FAST_TUNE, "--n-trials", "1", "--max-epochs", "1", "--final-epochs", "1"], env)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: Cannot write the model artifact" in done.stderr and "no space left" in done.stderr
    assert "Retry" not in done.stdout + done.stderr  # Prefect logs "Retry 1/3 will start ..." for each retry
    with Registry(f"sqlite:///{home / 'mnist-flow.db'}", str(tmp_path / "unused")) as reg:
        assert reg.list_versions() == []
    reliability.record("`python flows/mnist.py` with the artifacts on a full disk (1 MiB tmpfs)",
                       "the register task fails once (no retries), exit 2, the message names the disk; nothing "
                       "registered", f"exit 2 after {took:.0f} s for the whole run, 0 retries, 0 versions",
                       group="faults")


_REGISTER_AS_CHILD = """
import sys, torch
from mnist_flow.errors import StorageError
from mnist_flow.training.model import MLP
from mnist_flow.registry.store import Lineage, Registry
torch.manual_seed(0)
with Registry(sys.argv[1], sys.argv[2]) as reg:
    try:
        reg.register("mnist", MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={}, metrics={},
                     lineage=Lineage("mnist", "fp"))
    except StorageError as exc:
        print(exc)
        sys.exit(3)
"""


def test_artifacts_in_a_folder_without_write_permission_end_in_one_storage_error(tmp_path: Path,
                                                                                 reliability) -> None:
    """EACCES for real: root without CAP_DAC_OVERRIDE (setpriv) is refused by a chmod 555 folder like anyone."""
    import shutil
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    url = f"sqlite:///{tmp_path / 'mnist-flow.db'}"
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c",
                           _REGISTER_AS_CHILD, url, str(locked / "artifacts")], check=False, capture_output=True,
                          text=True,
                          timeout=120, env=clean_env(tmp_path / "home"))
    locked.chmod(0o755)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "no permission to write in" in done.stdout and str(locked) in done.stdout
    with Registry(url, str(tmp_path / "unused")) as reg:
        assert reg.list_versions() == []
    reliability.record("model artifacts written to a folder without write permission (chmod 555, EACCES)",
                       "one StorageError naming the folder and the fix, nothing registered",
                       done.stdout.splitlines()[0][:120], group="faults")


def test_the_study_database_filling_the_disk_during_tune_ends_in_one_message(
        full_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        reliability) -> None:
    path = full_disk / "mnist-flow.db"
    (full_disk / "filler").unlink()
    Registry(f"sqlite:///{path}", str(tmp_path / "artifacts")).migrate()  # the database exists, then the disk fills
    with open(full_disk / "filler", "wb") as handle, pytest.raises(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("MNIST_FLOW_THREADS", "1")
    code = cli_main(["tune", *FAST_TUNE, "--n-trials", "2", "--max-epochs", "1"])
    _, err = capsys.readouterr()
    message = err[err.find("error: "):]
    assert code == 2 and "disk is full" in message and "Traceback" not in err, err[-2000:]
    assert len(message.strip().splitlines()) == 2
    reliability.record("study database on a full disk during `mnist-flow tune` (Optuna's writes)",
                       "one message (disk full) and the fix, exit 2, no traceback", message.splitlines()[0][:120],
                       group="faults")
