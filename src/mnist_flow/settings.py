"""Typed settings, read once at the edges (CLI, flow entry point) and passed inward.

Every field can be set through an environment variable with the prefix ``MNIST_FLOW_``
(``MNIST_FLOW_HOME``, ``MNIST_FLOW_DATABASE_URL``, ...). Unknown ``MNIST_FLOW_*`` variables
and bad values are refused with a :class:`~mnist_flow.errors.ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mnist_flow.errors import ConfigError

ENV_PREFIX = "MNIST_FLOW_"

Device = Literal["auto", "cpu", "cuda", "mps"]


class Settings(BaseSettings):
    """Where mnist-flow keeps its state and how it reaches its services."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    home: Path = Field(Path(".mnist-flow"), description="Folder for the database, data cache and artifacts.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the study and registry database (default: SQLite under home).",
        repr=False,  # it may hold a password: never in a repr, a log line or a Prefect task's parameters
    )
    artifacts_url: str | None = Field(
        None, description="fsspec URL where model artifacts are written (default: home/artifacts)."
    )
    data_dir: Path | None = Field(None, description="Cache folder for downloaded datasets (default: home/data).")
    mirrors: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra dataset mirrors (comma-separated URLs), tried before torchvision's."
    )
    device: Device = Field("auto", description="Training device: auto picks CUDA, then MPS, then CPU.")
    threads: int | None = Field(None, ge=1, le=4096, description="Torch intra-op threads (default: torch's choice).")
    dashboard_url: str | None = Field(None, description="URL of a running optuna-dashboard, linked from runs.")
    max_image_pixels: int = Field(
        20_000_000, ge=1, le=1_000_000_000, description="Largest image (in pixels) that `mnist-flow predict` accepts."
    )
    promotion_margin: float = Field(
        0.0, ge=0.0, le=1.0, description="Test-accuracy gain a challenger needs over the champion."
    )
    promotion_alpha: float | None = Field(
        0.05, gt=0.0, le=1.0, description="Significance level of the McNemar test for promotion (unset: no test)."
    )
    heartbeat_interval: int = Field(
        10, ge=1, le=3600, description="Seconds between a running trial's heartbeats in the study database."
    )
    heartbeat_grace: int = Field(
        60,
        ge=1,
        le=7 * 86400,
        description="Seconds without a heartbeat after which a trial is failed and retried (a killed worker's trial).",
    )
    hang_multiple: float = Field(
        10.0,
        ge=1.0,
        description="A trial with no progress for this many times its expected epoch time is "
        "failed and retried (a stuck process; see docs/service.md).",
    )
    hang_min_seconds: float = Field(
        120.0, gt=0.0, description="The hang limit of a trial is never shorter than this many seconds."
    )
    multi_host: bool = Field(
        False,
        description="Trial workers (workers > 1) may run on other machines: SQLite and local-disk "
        "artifacts are then refused (see docs/scale-out.md).",
    )

    @field_validator("mirrors", mode="before")
    @classmethod
    def _split_mirrors(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("artifacts_url")
    @classmethod
    def _persistent_artifacts(cls, value: str | None) -> str | None:
        # memory:// (gone with the process) or http:// (read-only) cannot keep a registered model's files
        from mnist_flow.registry.artifacts import check_artifacts_url

        if value is None:
            return value
        try:
            return check_artifacts_url(value)
        except ConfigError as exc:
            raise ValueError(f"{exc.message} {exc.fix}".rstrip(".")) from None

    @field_validator("home", "data_dir")
    @classmethod
    def _folder_or_nothing_yet(cls, value: Path | None) -> Path | None:
        """A folder setting must name a folder, or a path that can become one (not a file, nor under one)."""
        if value is None:
            return value
        try:
            path = value.expanduser().absolute()
            existing = next((p for p in (path, *path.parents) if p.exists()), None)
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, no home for ~
            raise ValueError(f"{str(value)[:80]!r} is not a usable path ({exc})") from None
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == path else f"is under the file {existing}"
            raise ValueError(f"{str(value)[:80]!r} {where}, not a folder")
        return value

    @field_validator("promotion_alpha", mode="before")
    @classmethod
    def _empty_alpha_is_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @property
    def home_path(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_path / 'mnist-flow.db'}"

    @property
    def resolved_artifacts_url(self) -> str:
        return self.artifacts_url or str(self.home_path / "artifacts")

    @property
    def cache_dir(self) -> Path:
        return (self.data_dir or self.home_path / "data").expanduser().resolve()


def _unknown_env_keys() -> list[str]:
    # Case-insensitive, like pydantic-settings itself: `mnist_flow_threads` is honoured, so a lower-case
    # typo (`mnist_flow_theads`) must be refused too, not silently ignored.
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and ``overrides``), turning mistakes into one ConfigError."""
    unknown = _unknown_env_keys()
    if unknown:
        valid = ", ".join(ENV_PREFIX + n.upper() for n in Settings.model_fields)
        raise ConfigError(
            f"Unknown setting(s) in the environment: {', '.join(unknown)}.",
            fix=f"Unset them or use one of: {valid}.",
        )
    try:
        values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"Invalid setting: {problems}.", fix="Correct the value and run again.") from None
