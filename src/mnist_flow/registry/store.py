"""The model registry: versions, aliases (``champion``) and the promotion decision log.

Rows live in the study database (SQLite or PostgreSQL, tables prefixed ``mnist_flow_``); weights
and their JSON sidecar live in an :class:`~mnist_flow.registry.artifacts.ArtifactStore`. Artifacts are
written before the row is inserted, so a crash leaves at worst an orphan artifact, never a row
without its artifact. A gate decision passed to :meth:`Registry.register` is recorded in the same
transaction as the row, so a crash never leaves a version without its decision. Loading verifies every file that decides behaviour before using it: the
weights' and the sidecar's SHA-256 recorded in the row (rows registered before the sidecar's digest
was recorded: the content key in the artifact folder's name, which hashes both files), then the
sidecar's values, and it builds the network from the shapes in the verified weights' safetensors
header, so nothing is allocated from a claim that was not checked (safetensors only, never pickle).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from mnist_flow.errors import ArtifactIntegrityError, ConfigError, MnistFlowError, RegistryError
from mnist_flow.registry.artifacts import ArtifactStore, sha256
from mnist_flow.registry.promotion import Decision
from mnist_flow.registry.provenance import code_version
from mnist_flow.storage import db
from mnist_flow.training.model import MLP

if TYPE_CHECKING:
    from mnist_flow.review.predict import LoadedModel
    from mnist_flow.settings import Settings

CHAMPION = "champion"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"
INSERT_ATTEMPTS = 10
#: 8 attempts, backoff 0.1 s doubling to 2 s (x1-2 jitter): a write rides out a 7-14 s database outage.
WRITE_ATTEMPTS = 8


class ChampionMovedError(RegistryError):
    """The champion changed between computing a gate decision and recording it: compare again."""

    def __init__(self, name: str, expected: int | None, current: int | None) -> None:
        super().__init__(
            f"The champion of {name!r} changed from {expected} to {current} during the gate.",
            fix="Run the gate again: the challenger must be compared with the current champion.",
        )
        self.current = current


class Base(DeclarativeBase):
    """Declarative base of the registry tables (schema changes go through migrations/)."""


class ModelVersionRow(Base):
    __tablename__ = "mnist_flow_model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_mnist_flow_model_versions_name_version"),
        UniqueConstraint("idempotency_key", name="uq_mnist_flow_model_versions_idempotency_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    params: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    dataset_name: Mapped[str] = mapped_column(String(200))
    dataset_fingerprint: Mapped[str] = mapped_column(String(200))
    artifact_uri: Mapped[str] = mapped_column(Text)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    study_name: Mapped[str | None] = mapped_column(String(512))
    trial_number: Mapped[int | None] = mapped_column(Integer)
    flow_run_id: Mapped[str | None] = mapped_column(String(200))
    code_version: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(512))
    sidecar_sha256: Mapped[str | None] = mapped_column(String(64))  # NULL: registered before 0002


class AliasRow(Base):
    __tablename__ = "mnist_flow_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"],
            ["mnist_flow_model_versions.name", "mnist_flow_model_versions.version"],
            name="fk_mnist_flow_aliases_version",
        ),
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DecisionRow(Base):
    __tablename__ = "mnist_flow_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    name: Mapped[str] = mapped_column(String(64), index=True)
    challenger_version: Mapped[int] = mapped_column(Integer)
    champion_version: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    challenger_accuracy: Mapped[float | None] = mapped_column(Float)
    champion_accuracy: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    b: Mapped[int | None] = mapped_column(Integer)
    c: Mapped[int | None] = mapped_column(Integer)
    margin: Mapped[float | None] = mapped_column(Float)
    alpha: Mapped[float | None] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(64))
    flow_run_id: Mapped[str | None] = mapped_column(String(200))


def _utc(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; they were written in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def validate_name(value: str, what: str = "model name") -> str:
    """Return ``value`` if it is a valid model name or alias, else raise ConfigError."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(
            f"Invalid {what} {value!r}.",
            fix="Use 1-64 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit.",
        )
    return value


@dataclass(frozen=True)
class Lineage:
    """Where a model comes from: the data it was trained on, and the study, trial, flow run and seed."""

    dataset_name: str
    dataset_fingerprint: str
    study_name: str | None = None
    trial_number: int | None = None
    flow_run_id: str | None = None
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelVersion(Lineage):
    """One registered model version (immutable snapshot of its row and aliases), with its lineage."""

    name: str
    version: int
    created_at: datetime
    params: dict
    metrics: dict
    artifact_uri: str
    artifact_sha256: str
    code_version: dict
    aliases: tuple[str, ...]
    idempotency_key: str | None
    sidecar_sha256: str | None = None

    @property
    def sidecar_uri(self) -> str:
        """URI of the JSON sidecar next to the weights."""
        return self.artifact_uri.rsplit("/", 1)[0] + "/" + SIDECAR_FILE

    def to_dict(self) -> dict:
        """JSON-ready view: identity, aliases, params, metrics, dataset, artifact, lineage, created_at."""
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "created_at": self.created_at.isoformat(),
            "params": self.params,
            "metrics": self.metrics,
            "dataset": {"name": self.dataset_name, "fingerprint": self.dataset_fingerprint},
            "artifact": {"uri": self.artifact_uri, "sha256": self.artifact_sha256},
            "lineage": {
                "study_name": self.study_name,
                "trial_number": self.trial_number,
                "flow_run_id": self.flow_run_id,
                "code_version": self.code_version,
                "seed": self.seed,
            },
            "idempotency_key": self.idempotency_key,
        }


def _to_version(row: ModelVersionRow, aliases: tuple[str, ...]) -> ModelVersion:
    return ModelVersion(
        name=row.name,
        version=row.version,
        created_at=_utc(row.created_at),
        params=dict(row.params or {}),
        metrics=dict(row.metrics or {}),
        dataset_name=row.dataset_name,
        dataset_fingerprint=row.dataset_fingerprint,
        artifact_uri=row.artifact_uri,
        artifact_sha256=row.artifact_sha256,
        study_name=row.study_name,
        trial_number=row.trial_number,
        flow_run_id=row.flow_run_id,
        code_version=dict(row.code_version or {}),
        seed=row.seed,
        aliases=aliases,
        idempotency_key=row.idempotency_key,
        sidecar_sha256=row.sidecar_sha256,
    )


def _decision_dict(row: DecisionRow) -> dict:
    return {
        "id": row.id,
        "created_at": _utc(row.created_at).isoformat(),
        "name": row.name,
        "challenger_version": row.challenger_version,
        "champion_version": row.champion_version,
        "outcome": row.outcome,
        "reason": row.reason,
        "challenger_accuracy": row.challenger_accuracy,
        "champion_accuracy": row.champion_accuracy,
        "p_value": row.p_value,
        "b": row.b,
        "c": row.c,
        "margin": row.margin,
        "alpha": row.alpha,
        "actor": row.actor,
        "flow_run_id": row.flow_run_id,
    }


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"The {what} cannot be stored as JSON: {exc}.",
            fix="Pass plain numbers, strings, lists and dicts (no NaN or infinity).",
        ) from None


class Registry:
    """Model versions, aliases and promotion decisions in ``database_url``; artifacts in ``artifacts_url``."""

    def __init__(self, database_url: str, artifacts_url: str, *, create: bool = True) -> None:
        """``create=False`` (read-only commands): a SQLite file that does not exist is refused, not created."""
        self.database_url = database_url
        self.artifacts_url = artifacts_url
        self.create = create
        self._engine: Engine | None = None
        self._store: ArtifactStore | None = None
        self._migrated = False

    @classmethod
    def from_settings(cls, settings: Settings, *, create: bool = True) -> Registry:
        """A registry on the settings' database and artifacts URLs."""
        return cls(settings.resolved_database_url, settings.resolved_artifacts_url, create=create)

    def __repr__(self) -> str:
        return f"Registry({db.mask_url(self.database_url)!r}, {db.mask_url(self.artifacts_url)!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created on first use."""
        if self._engine is None:
            self._engine = db.make_engine(self.database_url)
        return self._engine

    @property
    def store(self) -> ArtifactStore:
        """The artifact store, created on first use."""
        if self._store is None:
            self._store = ArtifactStore(self.artifacts_url)
        return self._store

    def dispose(self) -> None:
        """Close pooled connections (the registry stays usable)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def migrate(self) -> None:
        """Create or upgrade the registry tables; idempotent and safe under concurrent starts."""
        from mnist_flow.registry import migrations

        db.retry_db(lambda: migrations.upgrade(self.engine), attempts=WRITE_ATTEMPTS, url=self.database_url)
        self._migrated = True

    def _ready(self) -> None:
        if not self._migrated:
            if not self.create:
                db.database_must_exist(self.database_url)
            self.migrate()

    def _read(self, fn: Any, attempts: int = 2) -> Any:
        self._ready()

        def run() -> Any:
            with Session(self.engine) as session:
                return fn(session)

        return db.retry_db(run, attempts=attempts, url=self.database_url)

    def _write(self, fn: Any) -> Any:
        self._ready()

        def run() -> Any:
            with Session(self.engine) as session, session.begin():
                return fn(session)

        return db.retry_db(run, attempts=WRITE_ATTEMPTS, url=self.database_url)

    # -- queries ----------------------------------------------------------------------------

    @staticmethod
    def _aliases(session: Session, name: str | None = None) -> dict[tuple[str, int], tuple[str, ...]]:
        query = select(AliasRow).order_by(AliasRow.alias)
        if name is not None:
            query = query.where(AliasRow.name == name)
        found: dict[tuple[str, int], list[str]] = {}
        for row in session.scalars(query):
            found.setdefault((row.name, row.version), []).append(row.alias)
        return {key: tuple(value) for key, value in found.items()}

    @staticmethod
    def _names(session: Session) -> list[str]:
        return list(session.scalars(select(ModelVersionRow.name).distinct().order_by(ModelVersionRow.name)))

    def _row(self, session: Session, name: str, ref: str | int) -> ModelVersionRow:
        names = self._names(session)
        if name not in names:
            raise RegistryError(
                f"No model named {name!r} is registered; registered names: {', '.join(names) or '(none)'}.",
                fix="Use one of the registered names, or register a model first.",
            )
        version = _as_version_number(ref)
        if version is None:
            alias = validate_name(str(ref), "alias")
            alias_row = session.get(AliasRow, (name, alias))
            if alias_row is None:
                existing = sorted(session.scalars(select(AliasRow.alias).where(AliasRow.name == name)))
                raise RegistryError(
                    f"Model {name!r} has no alias {alias!r}; aliases: {', '.join(existing) or '(none)'}.",
                    fix="Use a version number or an existing alias (champion appears after the first promotion).",
                )
            version = alias_row.version
        row = session.scalar(
            select(ModelVersionRow).where(ModelVersionRow.name == name, ModelVersionRow.version == version)
        )
        if row is None:
            versions = session.scalars(
                select(ModelVersionRow.version).where(ModelVersionRow.name == name).order_by(ModelVersionRow.version)
            )
            raise RegistryError(
                f"Model {name!r} has no version {version}; versions: {', '.join(map(str, versions))}.",
                fix="Pick one of the listed versions (see `mnist-flow registry list`).",
            )
        return row

    def _snapshot(self, session: Session, row: ModelVersionRow) -> ModelVersion:
        return _to_version(row, self._aliases(session, row.name).get((row.name, row.version), ()))

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        return self._read(self._names)

    def resolve_name(self, name: str | None) -> str:
        """``name`` itself, or the only registered name when ``name`` is None (else RegistryError)."""
        if name is not None:
            return name
        names = self.names()
        if len(names) == 1:
            return names[0]
        if not names:
            raise RegistryError(
                "No model is registered yet.",
                fix="Run the flow (`make run`) or `mnist-flow tune` and register a model first.",
            )
        raise RegistryError(f"Several models are registered: {', '.join(names)}.", fix="Choose one with --name NAME.")

    def list_versions(self, name: str | None = None) -> list[ModelVersion]:
        """All versions (of ``name``, or of every model), ordered by name then version."""

        def query(session: Session) -> list[ModelVersion]:
            statement = select(ModelVersionRow).order_by(ModelVersionRow.name, ModelVersionRow.version)
            if name is not None:
                statement = statement.where(ModelVersionRow.name == name)
            aliases = self._aliases(session, name)
            return [_to_version(row, aliases.get((row.name, row.version), ())) for row in session.scalars(statement)]

        return self._read(query)

    def get(self, name: str, ref: str | int) -> ModelVersion:
        """The version ``ref`` (a number, or an alias such as ``champion``) of model ``name``."""
        return self._read(lambda session: self._snapshot(session, self._row(session, name, ref)))

    def champion(self, name: str) -> ModelVersion | None:
        """The current champion of ``name``, or None if there is none yet."""

        def query(session: Session) -> ModelVersion | None:
            alias = session.get(AliasRow, (name, CHAMPION))
            if alias is None:
                return None
            return self._snapshot(session, self._row(session, name, alias.version))

        return self._read(query)

    # -- writes -----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        model: MLP,
        *,
        sidecar: dict,
        params: dict,
        metrics: dict,
        lineage: Lineage,
        idempotency_key: str | None = None,
        require_study: bool = False,
        decision: Decision | None = None,
        champion_version: int | None = None,
    ) -> ModelVersion:
        """Write the model's artifacts, then record a new version (or return the one with ``idempotency_key``).

        ``require_study``: refuse (RegistryError) when the database no longer holds the lineage's study: a SQLite
        file deleted during the run, or a database replaced by one whose studies do not include it. The
        lineage of a registered model never points at a study that does not exist.

        ``decision``: the gate's decision against ``champion_version``, recorded (and the champion alias
        moved) in the same transaction as the new row; ChampionMovedError if the champion is no longer
        ``champion_version`` by then. A version returned for an existing ``idempotency_key`` is returned
        as it is, with whatever decision it has.
        """
        validate_name(name)
        params = _json_ready(params, "params")
        metrics = _json_ready(metrics, "metrics")
        if require_study:
            self.require_database(lineage.study_name)
        if idempotency_key is not None:
            existing = self._by_key(idempotency_key)
            if existing is not None:
                return existing
        weights = model.to_safetensors()
        digest = sha256(weights)
        sidecar_bytes = json.dumps(
            _json_ready({"architecture": model.architecture(), **sidecar}, "sidecar"), indent=2, sort_keys=True
        ).encode()
        _check_sidecar(json.loads(sidecar_bytes), model.architecture(), "the sidecar to register", error=ConfigError)
        sidecar_digest = sha256(sidecar_bytes)
        # the folder hashes weights and sidecar together so equal weights with another sidecar never collide
        content_key = sha256(weights + b"\0" + sidecar_bytes)[:16]
        folder = f"{name}/{content_key}"
        self.store.write(f"{folder}/{SIDECAR_FILE}", sidecar_bytes)
        uri = self.store.write(f"{folder}/{WEIGHTS_FILE}", weights)
        versions = code_version()

        def insert(session: Session) -> ModelVersion:
            latest = session.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name))
            row = ModelVersionRow(
                name=name,
                version=(latest or 0) + 1,
                created_at=datetime.now(UTC),
                params=params,
                metrics=metrics,
                dataset_name=lineage.dataset_name,
                dataset_fingerprint=lineage.dataset_fingerprint,
                artifact_uri=uri,
                artifact_sha256=digest,
                study_name=lineage.study_name,
                trial_number=lineage.trial_number,
                flow_run_id=lineage.flow_run_id,
                code_version=versions,
                seed=lineage.seed,
                idempotency_key=idempotency_key,
                sidecar_sha256=sidecar_digest,
            )
            if require_study:
                self._require_study(session, lineage.study_name)
            session.add(row)
            session.flush()
            aliases: tuple[str, ...] = ()
            if decision is not None:
                current = self._current_champion(session, name)
                if current != champion_version:
                    raise ChampionMovedError(name, champion_version, current)
                self._log(
                    session,
                    name,
                    row.version,
                    champion_version,
                    decision.outcome,
                    decision.reason,
                    actor="gate",
                    decision=decision,
                    flow_run_id=lineage.flow_run_id,
                )
                if decision.outcome in ("promoted", "first"):
                    self._move_alias(session, name, CHAMPION, row.version)
                    aliases = (CHAMPION,)
            return _to_version(row, aliases)

        for _ in range(INSERT_ATTEMPTS):
            try:
                return self._write(insert)
            except IntegrityError:
                # another process took this version number or this idempotency key first
                if idempotency_key is not None:
                    existing = self._by_key(idempotency_key)
                    if existing is not None:
                        return existing
        raise RegistryError(
            f"Could not allocate a version number for {name!r} after {INSERT_ATTEMPTS} attempts.",
            fix="Too many concurrent registrations; run the registration again.",
        )

    def require_database(self, study_name: str | None) -> None:
        """RegistryError if the (SQLite) database holding ``study_name`` no longer exists; nothing is created."""
        path = db.sqlite_path(self.database_url) if db.is_sqlite(self.database_url) else None
        if path is not None and not path.exists():
            raise RegistryError(
                f"The database {path} no longer exists: it was deleted or moved during the run, and the study "
                f"{study_name!r} with it; the model is not registered (its lineage would point at a study that "
                "does not exist).",
                fix="Restore the database from a backup and run again, or start a new run (it creates a new study).",
            )

    def _require_study(self, session: Session, study_name: str | None) -> None:
        connection = session.connection()
        if not inspect(connection).has_table("studies"):
            return  # a registry-only database (no Optuna study was ever run here): nothing to check against
        found = connection.execute(text("SELECT 1 FROM studies WHERE study_name = :name"), {"name": study_name}).first()
        if found is None:
            raise RegistryError(
                f"The study {study_name!r} is not in the database {db.mask_url(self.database_url)}: the database "
                "was replaced or the study deleted during the run; the model is not registered (its lineage would "
                "point at a study that does not exist).",
                fix="Restore the database from a backup and run again, or start a new run (it creates a new study).",
            )

    def by_key(self, key: str) -> ModelVersion | None:
        """The version registered with idempotency key ``key``, or None."""
        return self._by_key(key)

    def _by_key(self, key: str) -> ModelVersion | None:
        def query(session: Session) -> ModelVersion | None:
            row = session.scalar(select(ModelVersionRow).where(ModelVersionRow.idempotency_key == key))
            return None if row is None else self._snapshot(session, row)

        return self._read(query, attempts=WRITE_ATTEMPTS)  # part of a write: same outage budget

    @staticmethod
    def _move_alias(session: Session, name: str, alias: str, version: int) -> None:
        row = session.get(AliasRow, (name, alias))
        now = datetime.now(UTC)
        if row is None:
            session.add(AliasRow(name=name, alias=alias, version=version, updated_at=now))
        else:
            row.version = version
            row.updated_at = now

    @staticmethod
    def _current_champion(session: Session, name: str) -> int | None:
        row = session.get(AliasRow, (name, CHAMPION))
        return None if row is None else row.version

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` of ``name`` at ``version``; moving ``champion`` is logged as a user decision."""
        validate_name(alias, "alias")

        def update(session: Session) -> None:
            self._row(session, name, int(version))
            if alias == CHAMPION:
                self._log(
                    session,
                    name,
                    int(version),
                    self._current_champion(session, name),
                    "promoted",
                    f"champion alias set to version {version}",
                    actor="user",
                )
            self._move_alias(session, name, alias, int(version))

        self._write(update)

    @staticmethod
    def _log(
        session: Session,
        name: str,
        challenger: int,
        champion: int | None,
        outcome: str,
        reason: str,
        *,
        actor: str,
        decision: Decision | None = None,
        flow_run_id: str | None = None,
        challenger_accuracy: float | None = None,
    ) -> None:
        session.add(
            DecisionRow(
                created_at=datetime.now(UTC),
                name=name,
                challenger_version=challenger,
                champion_version=champion,
                outcome=outcome,
                reason=reason,
                challenger_accuracy=decision.challenger_accuracy if decision else challenger_accuracy,
                champion_accuracy=decision.champion_accuracy if decision else None,
                p_value=decision.p_value if decision else None,
                b=decision.b if decision else None,
                c=decision.c if decision else None,
                margin=decision.margin if decision else None,
                alpha=decision.alpha if decision else None,
                actor=actor,
                flow_run_id=flow_run_id,
            )
        )

    def record_decision(
        self,
        name: str,
        decision: Decision,
        *,
        challenger_version: int,
        champion_version: int | None,
        actor: str = "gate",
        flow_run_id: str | None = None,
    ) -> None:
        """Log a gate decision; when it promotes, move ``champion`` in the same transaction."""

        def update(session: Session) -> None:
            self._row(session, name, int(challenger_version))
            self._log(
                session,
                name,
                int(challenger_version),
                champion_version,
                decision.outcome,
                decision.reason,
                actor=actor,
                decision=decision,
                flow_run_id=flow_run_id,
            )
            if decision.outcome in ("promoted", "first"):
                self._move_alias(session, name, CHAMPION, int(challenger_version))

        self._write(update)

    def promote(self, name: str, version: int, *, reason: str) -> None:
        """Make ``version`` champion by hand (logged as a decision with actor ``user``)."""

        def update(session: Session) -> None:
            row = self._row(session, name, int(version))
            accuracy = row.metrics.get("test_accuracy") if isinstance(row.metrics, dict) else None
            current = self._current_champion(session, name)
            self._log(
                session,
                name,
                row.version,
                current,
                "promoted",
                f"manual promotion: {reason}",
                actor="user",
                challenger_accuracy=float(accuracy) if isinstance(accuracy, (int, float)) else None,
            )
            self._move_alias(session, name, CHAMPION, row.version)

        self._write(update)

    def rollback(self, name: str, *, reason: str) -> ModelVersion:
        """Put back the champion that preceded the current one (per the decision log) and return it."""

        def update(session: Session) -> ModelVersion:
            stack = _champion_stack(
                session.scalars(select(DecisionRow).where(DecisionRow.name == name).order_by(DecisionRow.id))
            )
            current = self._current_champion(session, name)
            if len(stack) < 2 or current is None:
                raise RegistryError(
                    f"Model {name!r} has no previous champion to roll back to.",
                    fix="Promote a specific version instead: `mnist-flow registry promote VERSION`.",
                )
            target = stack[-2]
            row = self._row(session, name, target)
            self._log(session, name, target, current, "rolled_back", f"rollback: {reason}", actor="user")
            self._move_alias(session, name, CHAMPION, target)
            session.flush()
            return self._snapshot(session, row)

        return self._write(update)

    def history(self, name: str | None = None) -> list[dict]:
        """The decision log (oldest first), for ``name`` or for every model."""

        def query(session: Session) -> list[dict]:
            statement = select(DecisionRow).order_by(DecisionRow.id)
            if name is not None:
                statement = statement.where(DecisionRow.name == name)
            return [_decision_dict(row) for row in session.scalars(statement)]

        return self._read(query)

    # -- artifacts --------------------------------------------------------------------------

    def load(self, name: str, ref: str | int = CHAMPION) -> tuple[MLP, dict, ModelVersion]:
        """The model, its sidecar and its version, each file verified before it is used.

        The weights' SHA-256, then the sidecar's (recorded in the row; for older rows, the content key
        of the artifact folder), then the sidecar's values; the network is built from the shapes in
        the verified weights' header, which the sidecar's architecture must match. Any mismatch is an
        ArtifactIntegrityError naming the file.
        """
        version = self.get(name, ref)
        data = self.store.read(version.artifact_uri, max_bytes=MAX_WEIGHTS_BYTES)
        actual = sha256(data)
        if actual != version.artifact_sha256:
            raise ArtifactIntegrityError(
                f"artifact {version.artifact_uri} has SHA-256 {actual}, the registry recorded "
                f"{version.artifact_sha256}: the file was modified; re-register or restore it",
                fix="Restore the original file from a backup, or register the model again.",
            )
        sidecar_bytes = self.store.read(version.sidecar_uri, max_bytes=MAX_SIDECAR_BYTES)
        _verify_sidecar_digest(version, data, sidecar_bytes)
        try:
            sidecar = json.loads(sidecar_bytes)
        except ValueError:
            raise _sidecar_error(version.sidecar_uri, "it is not valid JSON") from None
        try:
            architecture = architecture_from_safetensors(data)
        except ValueError as exc:
            raise ArtifactIntegrityError(
                f"artifact {version.artifact_uri} is not the weights of an MLP: {exc}",
                fix="Restore both files of this version from a backup, or register the model again.",
            ) from None
        _check_sidecar(sidecar, architecture, f"artifact sidecar {version.sidecar_uri}")
        spec = sidecar.get("input") or {}
        if "preparation" not in spec:
            # written before the preparation was recorded: the (verified) row says which data it learnt from
            from mnist_flow.review.predict import preparation_for

            sidecar = {**sidecar, "input": {**spec, "preparation": preparation_for(version.dataset_name)}}
        try:
            model = MLP.from_safetensors(data, architecture)
        except (RuntimeError, SafetensorError, ConfigError, AttributeError, KeyError, TypeError, ValueError) as exc:
            # load_state_dict raises RuntimeError on shape or key mismatches, safetensors SafetensorError on bad bytes
            raise ArtifactIntegrityError(
                f"artifact {version.artifact_uri} cannot be loaded as the architecture its header gives "
                f"({architecture!r}): {_brief(exc)}",
                fix="Restore both files of this version from a backup, or register the model again.",
            ) from None
        return model, sidecar, version


#: Far above any model the search space allows (1024x512 hidden: 3.3 MB); refused before reading.
MAX_WEIGHTS_BYTES = 1 << 30
MAX_SIDECAR_BYTES = 1 << 20
_SAFETENSORS_HEADER_LIMIT = 1 << 20
_LAYER_KEY = re.compile(r"^net\.(\d+)\.(weight|bias)$")
_CONTENT_KEY = re.compile(r"^[0-9a-f]{16}$")


def _sidecar_error(uri: str, problem: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"artifact sidecar {uri} cannot be trusted: {problem}",
        fix="Restore the original model.json of this version from a backup, or register the model again.",
    )


def _verify_sidecar_digest(version: ModelVersion, weights: bytes, sidecar_bytes: bytes) -> None:
    """The sidecar's SHA-256 against the row, or (older rows) against the folder's content key."""
    if version.sidecar_sha256 is not None:
        actual = sha256(sidecar_bytes)
        if actual != version.sidecar_sha256:
            raise _sidecar_error(
                version.sidecar_uri,
                f"it has SHA-256 {actual}, the registry recorded {version.sidecar_sha256}: the file was modified",
            )
        return
    # Rows registered before the sidecar digest was recorded: register() named the folder after
    # sha256(weights + NUL + sidecar)[:16], which pins the sidecar to the (verified) weights.
    key = version.artifact_uri.rsplit("/", 2)[-2] if version.artifact_uri.count("/") >= 2 else ""
    if not _CONTENT_KEY.match(key):
        raise _sidecar_error(
            version.sidecar_uri, f"the registry holds no digest for it and its folder name {key!r} is not a content key"
        )
    if sha256(weights + b"\0" + sidecar_bytes)[:16] != key:
        raise _sidecar_error(
            version.sidecar_uri,
            f"it does not match the content key {key} of its folder "
            "(the weights and the sidecar were hashed together at registration): "
            "the file was modified",
        )


def architecture_from_safetensors(data: bytes) -> dict[str, Any]:
    """The MLP architecture that the safetensors header of ``data`` describes, read without allocating tensors.

    Raises ValueError unless the header is a chain of float32 ``net.<2i>.weight [out, in]`` and
    ``net.<2i>.bias [out]`` whose sizes add up to exactly the bytes that follow the header.
    """
    if len(data) < 8:
        raise ValueError("the file is too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > min(_SAFETENSORS_HEADER_LIMIT, len(data) - 8):
        raise ValueError(f"its header claims {size:,} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    layers: dict[int, dict[str, list[int]]] = {}
    total = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        match = _LAYER_KEY.match(key)
        if not match or not isinstance(entry, dict):
            raise ValueError(f"unexpected tensor {key!r}")
        shape = entry.get("shape")
        if (
            entry.get("dtype") != "F32"
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 24 for n in shape)
        ):
            raise ValueError(f"tensor {key!r} is not a float32 tensor of positive sizes")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = shape
        total += 4 * math.prod(shape)
    if total != len(data) - 8 - size:
        raise ValueError(f"its tensors need {total:,} bytes, the file holds {len(data) - 8 - size:,}")
    indices = sorted(layers)
    if not indices or indices != list(range(0, 2 * len(indices), 2)):
        raise ValueError(f"its layers are {indices}, expected net.0, net.2, ...")
    sizes: list[int] = []
    for index in indices:
        weight, bias = layers[index].get("weight"), layers[index].get("bias")
        if weight is None or bias is None or len(weight) != 2 or bias != [weight[0]]:
            raise ValueError(f"layer net.{index} lacks a [out, in] weight with its [out] bias")
        if sizes and weight[1] != sizes[-1]:
            raise ValueError(f"layer net.{index} takes {weight[1]} inputs, the layer before gives {sizes[-1]}")
        if not sizes:
            sizes.append(weight[1])
        sizes.append(weight[0])
    if len(sizes) < 3:
        raise ValueError("it has no hidden layer")
    return {"type": "mlp", "in_features": sizes[0], "hidden": sizes[1:-1], "num_classes": sizes[-1]}


def _check_sidecar(
    sidecar: Any, architecture: dict[str, Any], where: str, error: type[MnistFlowError] = ArtifactIntegrityError
) -> None:
    """The sidecar's architecture equals ``architecture`` and its input description is usable."""
    from mnist_flow.review.predict import Preprocessing, SidecarError

    def fail(problem: str) -> Exception:
        if error is ArtifactIntegrityError:
            return _sidecar_error(where.removeprefix("artifact sidecar "), problem)
        return error(f"{where} is not usable: {problem}.", fix="Register the model with a valid sidecar.")

    if not isinstance(sidecar, dict):
        raise fail("it is not a JSON object")
    claimed = sidecar.get("architecture")
    if not isinstance(claimed, dict) or claimed.get("type") != "mlp":
        raise fail(f"its architecture {claimed!r} is not an 'mlp' entry")
    expected = {
        "type": "mlp",
        "in_features": architecture["in_features"],
        "hidden": list(architecture["hidden"]),
        "num_classes": architecture["num_classes"],
    }
    if {**expected, **claimed} != expected or claimed.get("hidden") != expected["hidden"]:
        raise fail(f"its architecture {claimed!r} does not match the weights ({expected!r})")
    if expected["in_features"] != 28 * 28:
        raise fail(f"the weights take {expected['in_features']} inputs, not 784 (28x28)")
    try:
        spec = Preprocessing.from_sidecar(sidecar)
    except SidecarError as exc:
        raise fail(str(exc)) from None
    if "classes" in sidecar and len(spec.classes) != expected["num_classes"]:
        raise fail(f"it names {len(spec.classes)} classes, the weights give {expected['num_classes']}")


def _brief(exc: BaseException, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (load_state_dict lists every mismatched tensor)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_version_number(ref: str | int) -> int | None:
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        return ref
    text = str(ref).strip()
    if text.lower().startswith("v") and text[1:].isdigit():
        text = text[1:]
    return int(text) if text.isdigit() else None


def _champion_stack(decisions: Any) -> list[int]:
    """Replay the log: promotions push the new champion, rollbacks pop back to the previous one."""
    stack: list[int] = []
    for row in decisions:
        if row.outcome in ("promoted", "first"):
            if not stack or stack[-1] != row.challenger_version:
                stack.append(row.challenger_version)
        elif row.outcome == "rolled_back":
            if stack:
                stack.pop()
            if not stack or stack[-1] != row.challenger_version:
                stack.append(row.challenger_version)
    return stack


def load_model(
    ref: str | int = "champion", *, name: str | None = None, settings: Settings | None = None
) -> LoadedModel:
    """Load a registered model (alias or version number) with every file verified, for notebooks and scripts.

    ``mnist_flow.load_model("champion").predict(["digit.png"])``; ``.preprocessing(image)`` gives the
    model's input tensor. Settings come from the environment (``MNIST_FLOW_*``) unless given.
    """
    from mnist_flow.review.predict import LoadedModel, Preprocessing
    from mnist_flow.settings import load_settings

    settings = settings or load_settings()
    with Registry.from_settings(settings) as registry:
        model, sidecar, version = registry.load(registry.resolve_name(name), ref)
    return LoadedModel(model, Preprocessing.from_sidecar(sidecar), version)
