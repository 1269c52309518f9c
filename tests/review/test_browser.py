"""`mnist-flow dashboard` in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testlib import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "test-output" / "review" / "dashboard-study.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _require_browser():
    problem = None
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing: apt-get install chromium"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            problem = "the playwright package is missing: pip install -e '.[dev]'"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_playwright


def _command() -> list[str]:
    script = shutil.which("mnist-flow", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "mnist_flow.cli"]


def _wait_for_port(process: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mnist-flow dashboard exited with {process.returncode}: "
                                 f"{process.stderr.read().decode(errors='replace')}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"mnist-flow dashboard did not listen on port {port} within {timeout:.0f} s")


@pytest.mark.e2e
def test_the_dashboard_shows_the_study_and_its_lr_and_momentum_in_headless_chromium(world, tmp_path):
    sync_playwright = _require_browser()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_FLOW_")}
    env.update(MNIST_FLOW_HOME=str(world.home), MNIST_FLOW_THREADS="1")
    process = subprocess.Popen([*_command(), "dashboard", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    try:
        _wait_for_port(process, port)
        with sync_playwright() as playwright:
            # launch_persistent_context is how Playwright takes an explicit (empty) --user-data-dir
            context = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000})
            try:
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{port}/dashboard", timeout=60_000)
                page.get_by_text(world.study.study_name).first.click(timeout=60_000)
                page.wait_for_url(re.compile(r".*/dashboard/studies/\d+$"), timeout=30_000)
                best = page.get_by_text(re.compile(r"Best Trial \(number=\d+\)"))
                best.first.wait_for(timeout=60_000)
                page.get_by_text(re.compile(r"Params = \[.*lr: .*momentum: ")).first.wait_for(timeout=30_000)
                page.wait_for_timeout(1000)  # let the plots finish drawing for the screenshot
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
                text = page.inner_text("body")
            finally:
                context.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    assert world.study.study_name in text
    assert re.search(r"\blr: 0\.\d+", text) and re.search(r"\bmomentum: 0\.\d+", text)
    assert world.study.user_attrs["fingerprint"][:12] in text  # the study's user attributes are listed
    assert SCREENSHOT.stat().st_size > 10_000
