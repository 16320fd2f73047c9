"""Tables of the edit log (SQLAlchemy 2 typed models). The database is the source of truth.

``edits``        one row per accepted edit request (status applied / rolled_back / failed)
``edit_layers``  one row per editable module of the edit's method: router importance, selection,
                 ‖ΔW‖_F and rank of the stored delta (the audit of GET /edits/{id}/layers)
``edit_deltas``  the low-rank factors (LowRankDelta.to_bytes) and the editor's state blob; kept in
                 their own table so listing edits never reads megabytes of factors
``probes``       specificity probes: a prompt and the greedy answer recorded at creation

Alembic migrations in ``migrations/`` create exactly these tables; ``tests/test_service_db.py``
checks that the migrated schema and these models agree.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class EditStatus:
    APPLIED = "applied"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # logged, but applying it failed: never part of the weights
    ALL = (APPLIED, ROLLED_BACK, FAILED)


class Edit(Base):
    __tablename__ = "edits"
    # The replay and the replicas read what the weights hold from status alone: any other value would be
    # left out silently, so the database refuses it (migration 0004, which also refuses a log that has one).
    __table_args__ = (UniqueConstraint("idempotency_key", name="uq_edits_idempotency_key"),
                      CheckConstraint(f"status IN ({', '.join(repr(s) for s in EditStatus.ALL)})",
                                      name="ck_edits_status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    method: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(255))
    # identity of the base weights the edit was made on (service.weights.base_model_fingerprint);
    # NULL on rows of logs written before migration 0003
    base_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text, nullable=True)
    rephrases: Mapped[list] = mapped_column(JSON, default=list)
    locality: Mapped[list] = mapped_column(JSON, default=list)
    k: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(255), default="anonymous")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rolled_back_by: Mapped[str | None] = mapped_column(String(255), nullable=True)  # actor of the rollback
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    efficacy: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    fingerprint_after: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # how the writer summed the weights it fingerprinted (service.weights.FINGERPRINT_SCHEME); NULL before 0004
    fingerprint_scheme: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # which edits were active in the state fingerprint_after describes (service.verify.active_digest)
    active_digest: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # the writer's fingerprint and active edits right after this edit was rolled back
    fingerprint_rolled_back: Mapped[str | None] = mapped_column(String(64), nullable=True)
    active_digest_rolled_back: Mapped[str | None] = mapped_column(String(16), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    layers: Mapped[list["EditLayer"]] = relationship(
        back_populates="edit", cascade="all, delete-orphan", order_by="EditLayer.index")
    delta: Mapped["EditDelta"] = relationship(back_populates="edit", cascade="all, delete-orphan",
                                              uselist=False, lazy="raise")

    @property
    def selected_layers(self) -> list[str]:
        return [layer.module for layer in self.layers if layer.selected]


class EditLayer(Base):
    __tablename__ = "edit_layers"
    __table_args__ = (Index("ix_edit_layers_edit_index", "edit_id", "index", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    module: Mapped[str] = mapped_column(String(255))
    importance: Mapped[float] = mapped_column(Float)
    selected: Mapped[bool] = mapped_column(Boolean)
    delta_norm: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)

    edit: Mapped[Edit] = relationship(back_populates="layers")


class EditDelta(Base):
    __tablename__ = "edit_deltas"

    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id", ondelete="CASCADE"), primary_key=True)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    nbytes: Mapped[int] = mapped_column(Integer)
    state_blob: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    edit: Mapped[Edit] = relationship(back_populates="delta")


class Probe(Base):
    __tablename__ = "probes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt: Mapped[str] = mapped_column(Text)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    expected: Mapped[str] = mapped_column(Text)              # greedy continuation at creation
    expected_ids: Mapped[list] = mapped_column(JSON)         # its token ids: compared exactly
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fingerprint_at_creation: Mapped[str] = mapped_column(String(64))
