"""Command line of a flow script: flags built from the flow's signature, checked before any work.

``python flows/mnist.py --help`` lists every parameter with its type, default and description
(taken from :class:`~mnist_flow.params.RunParams`). Bad values end in one message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from mnist_flow.errors import INTERRUPTED, MnistFlowError, quiet_user_error_tracebacks
from mnist_flow.params import RunParams, flat_fields
from mnist_flow.settings import load_settings


def _arg_type(annotation: Any) -> tuple[Callable[[str], Any], list[str] | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if len(args) > 1:  # int | Literal["auto"]: RunParams converts the text
        return str, None
    if args:  # Optional[X] / X | None
        return _arg_type(args[0])
    if annotation in (int, float):
        return annotation, None
    return str, None


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``error: ...``, where the help is) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser(prog: str, description: str = "") -> argparse.ArgumentParser:
    """One ``--flag`` per flow parameter (:func:`~mnist_flow.params.flat_fields`), with its help text."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in flat_fields().items():
        convert, choices = _arg_type(field.annotation)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=convert,
            choices=choices,
            default=field.default,
            help=field.description,
        )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def run_flow_cli(
    flow_fn: Callable[..., Any],
    argv: list[str] | None = None,
    prog: str = "flows/mnist.py",
    before_run: Callable[[], None] | None = None,
) -> int:
    """Parse, validate, run the flow and print its summary. Returns the exit code (2: bad input, 130: Ctrl-C).

    ``before_run`` (e.g. starting Prefect's temporary server) runs once the arguments are valid.
    """
    fn = getattr(flow_fn, "fn", flow_fn)
    parser = build_parser(prog, (fn.__doc__ or "").strip())
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    as_json = args.pop("json")
    quiet_user_error_tracebacks()
    try:
        RunParams.parse(**args)  # bad values and settings are refused before anything starts
        load_settings()
        if before_run is not None:
            before_run()
        summary = flow_fn(**args)  # the flow checks its parameters again before Prefect creates a run
    except MnistFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        print("\n".join(["", "mnist-flow run summary", *summary.lines()]))
    return 0


_LIFELINE = """
import os, signal, sys, time
parent, child = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    try:
        os.kill(child, 0)
    except OSError:
        sys.exit(0)
    time.sleep(0.25)
try:
    os.kill(child, signal.SIGKILL)
except OSError:
    pass
"""


def tie_to_this_process(pid: int) -> None:
    """Kill process ``pid`` when this process dies, even by SIGKILL (a watchdog polls for its parent).

    ``python flows/mnist.py`` starts Prefect's temporary API server as a child; Prefect stops it at
    exit, but a killed flow would leave it listening. The watchdog is a tiny child of this process
    that notices being orphaned (its parent id changes) within a quarter of a second and kills ``pid``;
    it exits on its own when ``pid`` ends first.
    """
    import atexit
    import os
    import signal
    import subprocess

    def _own_group() -> None:  # Ctrl-C in the terminal reaches the flow, not its watchdog
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    lifeline = subprocess.Popen(
        [sys.executable, "-c", _LIFELINE, str(os.getpid()), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        preexec_fn=_own_group,
    )
    # At a normal exit this process stops ``pid`` itself (Prefect's atexit handler): the watchdog is ended
    # here, not left to notice within its quarter of a second, so that nothing of the run outlives it.
    atexit.register(_end, lifeline)


def _end(process: Any) -> None:
    """Stop the watchdog ``process`` and reap it (it may have ended already: then nothing happens)."""
    process.kill()
    process.wait()
