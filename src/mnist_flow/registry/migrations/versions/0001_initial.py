"""Initial registry schema: model versions, aliases, promotion decisions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mnist_flow_model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("dataset_name", sa.String(200), nullable=False),
        sa.Column("dataset_fingerprint", sa.String(200), nullable=False),
        sa.Column("artifact_uri", sa.Text, nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("study_name", sa.String(512), nullable=True),
        sa.Column("trial_number", sa.Integer, nullable=True),
        sa.Column("flow_run_id", sa.String(200), nullable=True),
        sa.Column("code_version", sa.JSON, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=True),
        sa.Column("idempotency_key", sa.String(512), nullable=True),
        sa.UniqueConstraint("name", "version", name="uq_mnist_flow_model_versions_name_version"),
        sa.UniqueConstraint("idempotency_key", name="uq_mnist_flow_model_versions_idempotency_key"),
    )
    op.create_table(
        "mnist_flow_aliases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["mnist_flow_model_versions.name", "mnist_flow_model_versions.version"],
            name="fk_mnist_flow_aliases_version",
        ),
    )
    op.create_table(
        "mnist_flow_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("challenger_version", sa.Integer, nullable=False),
        sa.Column("champion_version", sa.Integer, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("challenger_accuracy", sa.Float, nullable=True),
        sa.Column("champion_accuracy", sa.Float, nullable=True),
        sa.Column("p_value", sa.Float, nullable=True),
        sa.Column("b", sa.Integer, nullable=True),
        sa.Column("c", sa.Integer, nullable=True),
        sa.Column("margin", sa.Float, nullable=True),
        sa.Column("alpha", sa.Float, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("flow_run_id", sa.String(200), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("mnist_flow_decisions")
    op.drop_table("mnist_flow_aliases")
    op.drop_table("mnist_flow_model_versions")
