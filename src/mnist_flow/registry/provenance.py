"""Which code produced a model: the package version and, when available, the git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mnist_flow

GIT_TIMEOUT_S = 2.0


def git_commit(folder: Path | None = None) -> str | None:
    """The HEAD commit of the checkout holding ``folder`` (default: this package), or None."""
    cwd = folder or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    commit = result.stdout.strip()
    if result.returncode != 0 or len(commit) not in (40, 64):
        return None
    return commit


def code_version() -> dict:
    """``{"package": mnist_flow.__version__, "git_commit": <sha> or None}``; never raises."""
    return {"package": mnist_flow.__version__, "git_commit": git_commit()}
