"""optuna-dashboard on the study database, and the per-trial notes it shows.

``serve`` runs optuna-dashboard's WSGI app on a threaded ``wsgiref`` server (as the
``optuna-dashboard`` command does) against :func:`mnist_flow.storage.db.optuna_storage`, so SQLite gets WAL
and a busy timeout: the dashboard's reads never block a study that is writing trials.

``annotate_trials`` writes one Markdown note per completed trial (optuna-dashboard's note API,
:func:`optuna_dashboard.save_note`): the per-epoch curve the objective stored in the trial's user
attributes and, when the trial produced a registered model, that model's version. Notes are written
after a trial has finished, by the process that ran it, and a failure to write one is logged, never
raised: a note is not worth a study.
"""

from __future__ import annotations

import logging
import socketserver
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_flow.errors import ConfigError
from mnist_flow.formatting import format_params, format_value
from mnist_flow.storage.db import is_sqlite, mask_url, sqlite_path

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
CURVE_KEYS = ("val_accuracy", "train_loss", "epoch_seconds")


# --- notes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrialRef:
    """What ``optuna_dashboard.save_note`` reads from a trial: its storage, its study and its id.

    Building an ``optuna.Trial`` for a finished trial would run the sampler's ``before_trial`` hook;
    this reference only carries the three attributes the note API uses.
    """

    study: optuna.Study
    _trial_id: int

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        return self.study._storage


def trial_note(trial: FrozenTrial, model_version: Any | None = None) -> str:
    """The Markdown note of a finished trial: value, params, per-epoch curve, registered model (if any)."""
    lines = [f"## Trial {trial.number}", ""]
    value = format_value(trial.value)
    seconds = trial.duration.total_seconds() if trial.duration else None
    lines.append(
        f"**{trial.state.name.lower()}**, validation accuracy **{value}**"
        + (f", {seconds:.1f} s" if seconds is not None else "")
        + (f", worker `{trial.user_attrs['worker']}`" if "worker" in trial.user_attrs else "")
    )
    if trial.params:
        lines += ["", "Parameters: " + format_params(trial.params, code=True)]
    curve = {key: list(trial.user_attrs.get(key) or []) for key in CURVE_KEYS}
    epochs = max((len(values) for values in curve.values()), default=0)
    if epochs:
        lines += ["", "| epoch | val accuracy | train loss | seconds |", "|---:|---:|---:|---:|"]
        for i in range(epochs):
            cells = [_cell(curve[key], i, digits) for key, digits in zip(CURVE_KEYS, (4, 4, 2))]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    else:
        lines += ["", "No per-epoch curve was recorded for this trial."]
    lines.append("")
    if model_version is not None:
        name = getattr(model_version, "name", None)
        number = getattr(model_version, "version", model_version)
        aliases = tuple(getattr(model_version, "aliases", ()) or ())
        label = f"{name} v{number}" if name else f"v{number}"
        lines.append(f"Registered model: **{label}**" + (f" ({', '.join(aliases)})" if aliases else ""))
    else:
        lines.append("Registered model: none")
    return "\n".join(lines) + "\n"


def _cell(values: list[Any], index: int, digits: int) -> str:
    if index >= len(values) or values[index] is None:
        return "-"
    return f"{float(values[index]):.{digits}f}"


def read_note(study: optuna.Study, trial: FrozenTrial) -> str:
    """The trial's current dashboard note ('' when it has none)."""
    from optuna_dashboard import get_note

    return get_note(_TrialRef(study, trial._trial_id))


def annotate_trials(
    study: optuna.Study, model_versions: Mapping[int, Any] | None = None, *, trials: Iterable[FrozenTrial] | None = None
) -> int:
    """Write a dashboard note on every completed trial (or on ``trials``); return how many changed.

    ``model_versions`` maps a trial number to the registered model (a ``ModelVersion`` or a
    version number) trained from that trial. A note that already says the same is not rewritten,
    so calling this again after every run only touches trials whose note changed.
    """
    from optuna_dashboard import save_note

    model_versions = dict(model_versions or {})
    chosen = list(trials) if trials is not None else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    changed = 0
    for trial in chosen:
        if trial.state != TrialState.COMPLETE:
            continue
        body = trial_note(trial, model_versions.get(trial.number))
        if read_note(study, trial) == body:
            continue
        save_note(_TrialRef(study, trial._trial_id), body)
        changed += 1
    return changed


def annotate_finished_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Study callback: note the trial that just completed; log instead of raising, so the study runs on."""
    if trial.state != TrialState.COMPLETE:
        return
    try:
        annotate_trials(study, trials=[trial])
    except Exception as exc:  # noqa: BLE001 - a note must never stop a study
        logger.warning("could not write the dashboard note of trial #%d: %s", trial.number, mask_url(str(exc)))


# --- the server ----------------------------------------------------------------------------------


class _ThreadedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: " + format, *args)


def check_database_exists(database_url: str) -> None:
    """Refuse to serve a SQLite file that does not exist yet (serving would create an empty one)."""
    if is_sqlite(database_url):
        path = sqlite_path(database_url)
        if path is not None and not path.exists():
            raise ConfigError(
                f"No study database at {path}.",
                fix="Run the flow or `mnist-flow tune` first, or set MNIST_FLOW_DATABASE_URL.",
            )


#: Methods that only read; optuna-dashboard changes the study on every other one (notes, deletes, tells...).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ONLY_MESSAGE = (
    "This dashboard is read-only: it refuses requests that change the study. "
    "Restart it with `mnist-flow dashboard --allow-write` to edit notes or delete studies."
)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _ip(host: str) -> Any:
    """The host as an IP address, or None for a name."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_wildcard(host: str) -> bool:
    """Whether a bind address listens on every interface (the unspecified address, or empty)."""
    ip = _ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


class GuardedApp:
    """WSGI middleware in front of optuna-dashboard: read-only unless asked, and only for its own Host.

    * Any request that could change the study (a method other than GET/HEAD/OPTIONS) gets 403 and one
      message, unless ``allow_write``; then a browser's cross-site request (an ``Origin`` of another
      host) still gets 403, so a web page cannot post to it.
    * A request whose ``Host`` header is not the address the server is bound to gets 421: a page that
      rebinds its own DNS name to 127.0.0.1 reaches the port, but with its own name in ``Host``. Accepted:
      the bound host, for a loopback bind also ``localhost``/``127.0.0.1``/``[::1]``, for a wildcard bind
      (0.0.0.0) any IP address, and the names in ``allowed_hosts``; always with the bound port.
    """

    def __init__(self, app: Any, host: str, *, allow_write: bool = False, allowed_hosts: Iterable[str] = ()) -> None:
        self.app, self.host, self.allow_write = app, host.strip("[]").lower(), allow_write
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.port: int | None = None  # set once the server is bound (port 0 picks one)

    def _names(self) -> set[str]:
        names = {self.host, f"[{self.host}]"} | self.allowed_hosts
        ip = _ip(self.host)
        if self.host == "localhost" or (ip is not None and ip.is_loopback):
            names |= set(_LOOPBACK_NAMES)
        return names

    def host_allowed(self, header: str) -> bool:
        """Whether a ``Host`` (or an ``Origin``'s host part) names this server: right name, right port."""
        parts = _split_host(header)
        if parts is None:
            return False
        name, port = parts
        if (int(port) if port.isdigit() else 80 if not port else -1) != self.port:
            return False
        if _is_wildcard(self.host) and _ip(name) is not None:
            return True
        return name in self._names()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if not self.host_allowed(environ.get("HTTP_HOST", "")):
            return _refuse(
                start_response,
                "421 Misdirected Request",
                f"Host {environ.get('HTTP_HOST', '')[:100]!r} is not this dashboard's address; "
                "open it at the address it printed (or pass --allowed-host NAME).",
            )
        if method not in SAFE_METHODS:
            if not self.allow_write:
                return _refuse(start_response, "403 Forbidden", READ_ONLY_MESSAGE)
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and not self.host_allowed(origin.split("://", 1)[-1].rstrip("/")):
                return _refuse(
                    start_response,
                    "403 Forbidden",
                    f"Cross-site request from {origin[:100]!r} refused: changes come only from "
                    "the dashboard's own pages.",
                )
        return self.app(environ, start_response)


def _split_host(header: str) -> tuple[str, str] | None:
    """``name:port``, ``[v6]:port`` or ``name`` as (name, port); None when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        name, rest = header[: end + 1], header[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name, port


def _refuse(start_response: Any, status: str, message: str) -> list[bytes]:
    import json

    body = json.dumps({"reason": message}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def make_dashboard_server(
    database_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    allow_write: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> WSGIServer:
    """A threaded WSGI server bound to ``host:port`` serving optuna-dashboard on ``database_url``.

    Read-only unless ``allow_write``; requests for another ``Host`` are refused (see :class:`GuardedApp`).
    """
    from optuna_dashboard import wsgi

    from mnist_flow.storage.db import dispose_storage, optuna_storage

    check_database_exists(database_url)
    storage = optuna_storage(database_url)
    app = GuardedApp(wsgi(storage), host, allow_write=allow_write, allowed_hosts=allowed_hosts)
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except (OSError, OverflowError, ValueError) as exc:  # busy port, unknown host, a NUL byte in the name
        dispose_storage(storage)
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(
            f"Cannot listen on {host[:80]}:{port}: {reason}.",
            fix="Pick a free port with --port (or stop what is using it), and for --host an address "
            "of this machine (default 127.0.0.1).",
        ) from None
    app.port = server.server_address[1]
    return server


def serve(
    database_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    out: TextIO | None = None,
    allow_write: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> None:
    """Serve optuna-dashboard on ``database_url`` until interrupted (Ctrl-C returns quietly)."""
    out = out or sys.stderr
    server = make_dashboard_server(database_url, host, port, allow_write=allow_write, allowed_hosts=allowed_hosts)
    bound_host, bound_port = str(server.server_address[0]), server.server_address[1]
    mode = "read-write" if allow_write else "read-only (--allow-write to edit)"
    print(
        f"optuna-dashboard on http://{bound_host}:{bound_port}/, {mode} (database {mask_url(database_url)}); "
        "Ctrl-C stops it",
        file=out,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
