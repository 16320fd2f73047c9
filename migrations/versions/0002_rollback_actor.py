"""edits.rolled_back_by: the actor (API key name or hash prefix) who rolled the edit back

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("edits") as batch:  # batch: SQLite cannot ALTER TABLE ... DROP COLUMN in place
        batch.add_column(sa.Column("rolled_back_by", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("rolled_back_by")
