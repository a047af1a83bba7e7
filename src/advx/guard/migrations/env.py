"""Alembic's entry point for the review store's migrations.

advx runs them itself (``advx.guard.store``), on a connection it already holds inside one
transaction, so there is no ini file and no URL here: the connection comes in through the
config's ``attributes``.
"""

from alembic import context

connection = context.config.attributes["connection"]
# batch mode: SQLite cannot ALTER most things in place; alembic copies the table instead
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
