"""edit log: edits, edit_layers, edit_deltas, probes

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edits",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("rephrases", sa.JSON(), nullable=False),
        sa.Column("locality", sa.JSON(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("loss_before", sa.Float(), nullable=True),
        sa.Column("n_tokens", sa.Integer(), nullable=True),
        sa.Column("efficacy", sa.JSON(), nullable=True),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("fingerprint_after", sa.String(64), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_edits_idempotency_key"),
    )
    op.create_index("ix_edits_status", "edits", ["status"])
    op.create_table(
        "edit_layers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("edit_id", sa.Integer(), sa.ForeignKey("edits.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("module", sa.String(255), nullable=False),
        sa.Column("importance", sa.Float(), nullable=False),
        sa.Column("selected", sa.Boolean(), nullable=False),
        sa.Column("delta_norm", sa.Float(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
    )
    op.create_index("ix_edit_layers_edit_index", "edit_layers", ["edit_id", "index"], unique=True)
    op.create_table(
        "edit_deltas",
        sa.Column("edit_id", sa.Integer(), sa.ForeignKey("edits.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("nbytes", sa.Integer(), nullable=False),
        sa.Column("state_blob", sa.LargeBinary(), nullable=True),
    )
    op.create_table(
        "probes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("max_new_tokens", sa.Integer(), nullable=False),
        sa.Column("expected", sa.Text(), nullable=False),
        sa.Column("expected_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint_at_creation", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("probes")
    op.drop_table("edit_deltas")
    op.drop_index("ix_edit_layers_edit_index", table_name="edit_layers")
    op.drop_table("edit_layers")
    op.drop_index("ix_edits_status", table_name="edits")
    op.drop_table("edits")
