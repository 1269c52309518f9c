"""``mnist-flow registry``: list, show, promote, roll back and audit registered models.

Mounted by the main CLI, which turns :class:`~mnist_flow.errors.MnistFlowError` into one
message and a non-zero exit; nothing here catches it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mnist_flow.errors import ConfigError
from mnist_flow.formatting import format_value as _fmt
from mnist_flow.registry.store import ModelVersion, Registry
from mnist_flow.settings import load_settings

registry_app = typer.Typer(help="Inspect and manage registered models.", no_args_is_help=True)

NameOption = Annotated[str | None, typer.Option("--name", "-n", help="Model name (default: the only one).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only.")]


#: Versions are SQL INTEGERs: SQLite (and PostgreSQL's BIGINT) stop at 2**63 - 1.
MAX_VERSION = 2**63 - 1
VersionArgument = Annotated[int, typer.Argument(min=1, max=MAX_VERSION, help="Version to make champion.")]


def check_ref(ref: str) -> str:
    """A version reference as the user typed it: refuse numbers the database cannot hold (one ConfigError)."""
    text = ref.strip()
    digits = text[1:] if text[:1] in ("v", "V") else text
    if digits.isascii() and digits.isdigit() and not 1 <= int(digits) <= MAX_VERSION:
        raise ConfigError(
            f"Version {text[:40]!r} is out of range: versions are 1 to {MAX_VERSION}.",
            fix="Pass a version number from `mnist-flow registry list`, or an alias such as champion.",
        )
    if not text.isascii() or not text.isprintable():
        raise ConfigError(
            f"Version or alias {text[:40]!r} has characters a version or alias cannot have.",
            fix="Pass a version number from `mnist-flow registry list`, or an alias such as champion.",
        )
    return text


def _registry() -> Registry:
    """The settings' registry; use it in a ``with`` block so its connections are closed.

    A SQLite database that does not exist is refused (a mistyped path must not create an empty one).
    """
    return Registry.from_settings(load_settings(), create=False)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def _versions_table(versions: list[ModelVersion]) -> Table:
    seen = [v.params.get("trained_on") == "train+val" for v in versions]
    caption = "* trained on its validation images too (final_data=train+val)" if any(seen) else None
    table = Table(title="Registered models", caption=caption)
    for column in ("name", "version", "aliases", "created (UTC)", "val acc", "test acc", "dataset", "study/trial"):
        table.add_column(column)
    for v, val_seen in zip(versions, seen, strict=True):
        lineage = f"{v.study_name}#{v.trial_number}" if v.study_name else "-"
        table.add_row(
            v.name,
            str(v.version),
            ", ".join(v.aliases) or "-",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _fmt(v.metrics.get("val_accuracy")) + ("*" if val_seen else ""),
            _fmt(v.metrics.get("test_accuracy")),
            f"{v.dataset_name} ({v.dataset_fingerprint[:12]})",
            lineage,
        )
    return table


@registry_app.command("list")
def list_command(name: NameOption = None, as_json: JsonOption = False) -> None:
    """List registered versions (of --name, or of every model)."""
    with _registry() as registry:
        versions = registry.list_versions(name)
    if as_json:
        _echo_json([v.to_dict() for v in versions])
    elif not versions:
        Console().print("No model registered yet.")
    else:
        Console().print(_versions_table(versions))


@registry_app.command("show")
def show_command(
    ref: Annotated[str, typer.Argument(help="Version number or alias, e.g. champion.")],
    name: NameOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one version with its metrics, dataset, artifact and lineage."""
    ref = check_ref(ref)
    with _registry() as registry:
        version = registry.get(registry.resolve_name(name), ref)
    data = version.to_dict()
    if as_json:
        _echo_json(data)
        return
    table = Table(title=f"{version.name} v{version.version}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key, json.dumps(value, indent=1) if isinstance(value, (dict, list)) else _fmt(value))
    Console().print(table)


@registry_app.command("promote")
def promote_command(
    version: VersionArgument,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the history).")],
    name: NameOption = None,
) -> None:
    """Make VERSION the champion by hand (recorded in the history)."""
    with _registry() as registry:
        model = registry.resolve_name(name)
        registry.promote(model, version, reason=reason)
    Console().print(f"{model} v{version} is now champion.")


@registry_app.command("rollback")
def rollback_command(
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the history).")], name: NameOption = None
) -> None:
    """Give the champion alias back to the previous champion."""
    with _registry() as registry:
        model = registry.resolve_name(name)
        restored = registry.rollback(model, reason=reason)
    Console().print(f"{model} v{restored.version} is champion again.")


@registry_app.command("history")
def history_command(name: NameOption = None, as_json: JsonOption = False) -> None:
    """Show promotion decisions (of --name, or of every model), oldest first."""
    with _registry() as registry:
        entries = registry.history(name)
    if as_json:
        _echo_json(entries)
        return
    if not entries:
        Console().print("No decision recorded yet.")
        return
    table = Table(title="Promotion history")
    for column in ("when (UTC)", "name", "outcome", "challenger", "champion", "acc (chal/champ)", "p", "actor"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", overflow="fold")
    for e in entries:
        table.add_row(
            e["created_at"][:19].replace("T", " "),
            e["name"],
            e["outcome"],
            str(e["challenger_version"]),
            _fmt(e["champion_version"]),
            f"{_fmt(e['challenger_accuracy'])}/{_fmt(e['champion_accuracy'])}",
            _fmt(e["p_value"]),
            e["actor"],
            e["reason"],
        )
    Console().print(table)
