"""The review queue, the query-attack alerts and the store's own settings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.String(200), nullable=False, server_default=""),
        sa.Column("request_id", sa.String(200), nullable=True),
        # the input, losslessly: raw bytes (float32, C order; or JSON for a row that was not
        # an array at all), its shape as JSON and the sha256 of the bytes
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("input_dtype", sa.String(16), nullable=False),
        sa.Column("input_shape", sa.Text, nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("answered", sa.Integer, nullable=True),
        sa.Column("predicted", sa.Integer, nullable=True),
        sa.Column("confidence", sa.Float, nullable=True),
        sa.Column("probs", sa.Text, nullable=True),
        sa.Column("scores", sa.Text, nullable=False, server_default="{}"),
        sa.Column("reasons", sa.Text, nullable=False, server_default="[]"),
        sa.Column("model_version", sa.String(200), nullable=False, server_default=""),
        sa.Column("policy_hash", sa.String(200), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("label", sa.Integer, nullable=True),
        sa.Column("labelled_by", sa.String(200), nullable=True),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_review_items_status_id", "review_items", ["status", "id"])
    op.create_index("ix_review_items_request_id", "review_items", ["request_id"])
    op.create_index("ix_review_items_client", "review_items", ["client"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.String(200), nullable=False),
        sa.Column("queries", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_alerts_time", "alerts", ["time"])
    op.create_table(
        "store_meta",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("store_meta")
    op.drop_index("ix_alerts_time", "alerts")
    op.drop_table("alerts")
    op.drop_index("ix_review_items_client", "review_items")
    op.drop_index("ix_review_items_request_id", "review_items")
    op.drop_index("ix_review_items_status_id", "review_items")
    op.drop_table("review_items")
