"""edits.status constrained to applied / rolled_back / failed; what a replica verifies its weights against

- ``ck_edits_status``: the replay and every replica decide what the served weights hold from ``status``
  alone, so a row with any other value (a typo of a hand-written fix, a status of a future version) would
  be silently left out of the weights. The upgrade refuses a log that has such rows and names them, and
  the constraint keeps new ones out.
- ``fingerprint_scheme``: how the writer summed the weights whose fingerprint it recorded
  (service.weights.FINGERPRINT_SCHEME); NULL on older rows, whose fingerprints a replica cannot compare.
- ``active_digest``: which edits were active in the state ``fingerprint_after`` describes (service.verify);
- ``fingerprint_rolled_back``, ``active_digest_rolled_back``: the same for the state right after the rollback.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATUSES = ("applied", "rolled_back", "failed")  # service.models.EditStatus.ALL, frozen at this revision


def upgrade() -> None:
    bind = op.get_bind()
    edits = sa.table("edits", sa.column("id", sa.Integer), sa.column("status", sa.String))
    bad = bind.execute(sa.select(edits.c.id, edits.c.status).where(
        sa.or_(edits.c.status.is_(None), edits.c.status.not_in(STATUSES))).order_by(edits.c.id).limit(11)).all()
    if bad:
        shown = ", ".join(f"edit {i}: {s!r}" for i, s in bad[:10]) + (" and more" if len(bad) > 10 else "")
        raise RuntimeError(
            f"the edit log has rows whose status is not one of {', '.join(STATUSES)} ({shown}); the replay would "
            "leave them out of the weights without a word. Fix those rows (UPDATE edits SET status = ... WHERE "
            "id = ...) to what they are, then upgrade again; nothing was changed")
    with op.batch_alter_table("edits") as batch:  # batch: SQLite cannot ALTER TABLE ... ADD CONSTRAINT in place
        batch.add_column(sa.Column("fingerprint_scheme", sa.String(16), nullable=True))
        batch.add_column(sa.Column("active_digest", sa.String(16), nullable=True))
        batch.add_column(sa.Column("fingerprint_rolled_back", sa.String(64), nullable=True))
        batch.add_column(sa.Column("active_digest_rolled_back", sa.String(16), nullable=True))
        batch.create_check_constraint("ck_edits_status", sa.column("status").in_(STATUSES))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_constraint("ck_edits_status", type_="check")
        batch.drop_column("active_digest_rolled_back")
        batch.drop_column("fingerprint_rolled_back")
        batch.drop_column("active_digest")
        batch.drop_column("fingerprint_scheme")
