"""edits.base_fingerprint: the identity of the base model an edit was made on

A server refuses to start on a log written for another base model (service.engine.BaseModelMismatch).
Rows of logs written before this revision have none and are compared by model name only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("edits") as batch:  # batch: SQLite cannot ALTER TABLE ... DROP COLUMN in place
        batch.add_column(sa.Column("base_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("base_fingerprint")
