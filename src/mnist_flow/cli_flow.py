"""Command line of a flow script: flags built from the flow's signature, checked before any work.

``python flows/mnist.py --help`` lists every parameter with its type, default and description
(taken from :class:`~mnist_flow.pipeline.RunParams`). Bad values end in one message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from mnist_flow.errors import MnistFlowError
from mnist_flow.pipeline import RunParams, summary_lines


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


def build_parser(prog: str, description: str = "") -> argparse.ArgumentParser:
    """One ``--flag`` per field of :class:`RunParams` (the flow's parameters), with its help text."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in RunParams.model_fields.items():
        convert, choices = _arg_type(field.annotation)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=convert, choices=choices,
                            default=field.default, help=field.description)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def run_flow_cli(flow_fn: Callable[..., Any], argv: list[str] | None = None, prog: str = "flows/mnist.py") -> int:
    """Parse, validate, run the flow and print its summary. Returns the exit code."""
    fn = getattr(flow_fn, "fn", flow_fn)
    parser = build_parser(prog, (fn.__doc__ or "").strip())
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    try:
        summary = flow_fn(**args)  # the flow checks its parameters before Prefect creates a run
    except MnistFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print("\n".join(["", "mnist-flow run summary", *summary_lines(summary)]))
    return 0
