"""Alembic environment of the mnist-flow registry: run programmatically by ``migrations.upgrade``.

The version table is ``mnist_flow_alembic_version`` so that Optuna's own ``alembic_version``
in the same database is left alone.
"""

from __future__ import annotations

from alembic import context

from mnist_flow.registry.migrations import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
