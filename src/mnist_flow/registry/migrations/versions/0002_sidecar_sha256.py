"""Record the SHA-256 of each version's sidecar (model.json), verified on every load like the weights'.

Rows registered before this revision keep NULL: their sidecar is verified by the content key of the
artifact folder (sha256(weights + NUL + sidecar)[:16]), which register() has always used.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mnist_flow_model_versions", sa.Column("sidecar_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mnist_flow_model_versions") as batch:
        batch.drop_column("sidecar_sha256")
