"""The review store's schema migrations (alembic scripts, run by advx.guard.store)."""
