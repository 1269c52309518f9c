"""How mnist-flow's command-line processes end (`mnist_flow.cli.process.exit_process`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from mnist_flow.cli.process import exit_process

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late() -> None:
        time.sleep(0.5)
        (out / "thread").write_text("finished")

    threading.Thread(target=late).start()  # not a daemon: Python waits for it, and so must exit_process
    pool = ThreadPoolExecutor(1)  # an idle pool's worker is a non-daemon thread too: shut down, not waited on forever
    pool.submit(print, "from the pool", end="; ").result()
    sys.stdout.write("no newline, still buffered")
    sys.stderr.write("and on stderr")
    exit_process(3)
    (out / "after").write_text("must not run")
    """
)


def test_it_does_what_python_does_at_exit_then_ends_with_the_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=50, check=False
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "from the pool; no newline, still buffered"
    assert proc.stderr == "and on stderr"
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()


def test_the_console_script_and_the_flow_script_end_through_it() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mnist-flow"] == "mnist_flow.cli:run"
    assert "exit_process(main())" in (root / "flows" / "mnist.py").read_text()


def test_the_console_script_keeps_the_exit_codes_and_messages(tmp_path: Path) -> None:
    bad = tmp_path / "registry.db"
    bad.write_text("not a database")
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_flow.cli", "registry", "list"],
        env={**os.environ, "MNIST_FLOW_DATABASE_URL": f"sqlite:///{bad}"},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_server_watchdog_ends_with_the_process_not_after_it(tmp_path: Path) -> None:
    # flows/mnist.py ties the temporary server to itself with a watchdog child; Prefect stops the server at
    # exit, and the watchdog must be gone when the process is, not a quarter of a second later
    script = textwrap.dedent(
        """
        import subprocess, sys
        from mnist_flow.cli.flow import tie_to_this_process
        from mnist_flow.cli.process import exit_process

        server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        tie_to_this_process(server.pid)
        server.kill()  # as Prefect's atexit handler stops the server, just before the end
        server.wait()
        exit_process(0)
        """
    )
    token = f"MNIST_FLOW_TEST_TOKEN={tmp_path.name}"
    env = {**os.environ, "MNIST_FLOW_TEST_TOKEN": tmp_path.name}
    subprocess.run([sys.executable, "-c", script], env=env, timeout=50, check=True)
    alive = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token.encode() in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                alive += [environ.parent.name] if state != "Z" else []
        except (OSError, IndexError):
            continue
    assert not alive, f"left running: {alive}"
