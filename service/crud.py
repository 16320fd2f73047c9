"""Reads and writes of the edit log. Functions take a Session and never commit on their own,
except where the docstring says so: the caller decides what one transaction is."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from .models import Edit, EditDelta, EditLayer, EditStatus, Probe, utcnow


def get_edit(session: Session, edit_id: int) -> Edit | None:
    return session.scalars(select(Edit).options(selectinload(Edit.layers)).where(Edit.id == edit_id)).first()


def get_edit_by_key(session: Session, key: str) -> Edit | None:
    return session.scalars(select(Edit).options(selectinload(Edit.layers))
                           .where(Edit.idempotency_key == key)).first()


def list_edits(session: Session, limit: int = 50, offset: int = 0, status: str | None = None) -> Sequence[Edit]:
    """Newest first."""
    q = select(Edit).options(selectinload(Edit.layers)).order_by(Edit.id.desc()).limit(limit).offset(offset)
    if status:
        q = q.where(Edit.status == status)
    return session.scalars(q).all()


def count_edits(session: Session, status: str | None = None) -> int:
    q = select(func.count(Edit.id))
    if status:
        q = q.where(Edit.status == status)
    return int(session.scalar(q) or 0)


def last_edit_id(session: Session) -> int | None:
    return session.scalar(select(func.max(Edit.id)))


def applied_edit_ids(session: Session) -> list[int]:
    """Ids of every applied edit, ascending: the edits the served weights must hold."""
    return list(session.scalars(select(Edit.id).where(Edit.status == EditStatus.APPLIED).order_by(Edit.id)))


def invalid_statuses(session: Session, limit: int = 10) -> list[tuple[int, str]]:
    """(id, status) of rows whose status is none of EditStatus.ALL (ck_edits_status keeps them out since 0004)."""
    return [tuple(r) for r in session.execute(select(Edit.id, Edit.status).where(Edit.status.not_in(EditStatus.ALL))
                                              .order_by(Edit.id).limit(limit))]


@dataclass(frozen=True)
class LogRow:
    """What a replica needs of one edit to know which weights the log wants and which fingerprint they have."""
    id: int
    status: str
    fingerprint_after: str | None
    fingerprint_scheme: str | None
    active_digest: str | None
    fingerprint_rolled_back: str | None
    active_digest_rolled_back: str | None


def log_rows(session: Session) -> list[LogRow]:
    """Every edit's LogRow, ascending id, in ONE statement: the applied ids and the fingerprints a replica
    verifies against come from the same snapshot of the log."""
    q = select(Edit.id, Edit.status, Edit.fingerprint_after, Edit.fingerprint_scheme, Edit.active_digest,
               Edit.fingerprint_rolled_back, Edit.active_digest_rolled_back).order_by(Edit.id)
    return [LogRow(*r) for r in session.execute(q)]


def applied_facts(session: Session) -> list[tuple[int, str, str]]:
    """(id, prompt, target) of every applied edit, ascending: what edit retention checks."""
    return [tuple(r) for r in session.execute(select(Edit.id, Edit.prompt, Edit.target)
                                              .where(Edit.status == EditStatus.APPLIED).order_by(Edit.id))]


def log_base_models(session: Session, ids: list[int] | None = None) -> list[tuple[str, str | None, int]]:
    """(model, base_fingerprint, number of edits) of every distinct base model in the log (or among
    the edits ``ids``), most edits first; base_fingerprint is None on rows older than migration 0003."""
    q = select(Edit.model, Edit.base_fingerprint, func.count(Edit.id)).group_by(Edit.model, Edit.base_fingerprint)
    if ids is not None:
        q = q.where(Edit.id.in_(ids))
    rows = [(model, fp, int(n)) for model, fp, n in session.execute(q)]
    return sorted(rows, key=lambda r: (-r[2], r[0], r[1] or ""))


def edit_methods(session: Session, ids: list[int]) -> dict[int, str]:
    return dict(session.execute(select(Edit.id, Edit.method).where(Edit.id.in_(ids))).all())


def delta_blobs(session: Session, ids: list[int]) -> list[tuple[int, bytes]]:
    """(id, stored delta) of the edits ``ids``, in id order (what a rollback re-adds)."""
    return [tuple(r) for r in session.execute(select(EditDelta.edit_id, EditDelta.blob)
                                              .where(EditDelta.edit_id.in_(ids)).order_by(EditDelta.edit_id))]


def state_blobs(session: Session, ids: list[int]) -> dict[int, tuple[str, bytes | None]]:
    """{id: (method, editor state blob)} of the edits ``ids`` (RLSEdit's keys; None for stateless editors)."""
    rows = session.execute(select(Edit.id, Edit.method, EditDelta.state_blob)
                           .join(EditDelta, EditDelta.edit_id == Edit.id).where(Edit.id.in_(ids)))
    return {i: (m, b) for i, m, b in rows}


def edits_with_deltas(session: Session, ids: list[int]) -> list[tuple[Edit, EditDelta]]:
    """The edits ``ids`` with their stored deltas, in id order (what a replay applies)."""
    rows = session.execute(select(Edit, EditDelta).join(EditDelta, EditDelta.edit_id == Edit.id)
                           .where(Edit.id.in_(ids)).order_by(Edit.id)).all()
    return [(e, d) for e, d in rows]


def add_edit(session: Session, edit: Edit, layers: list[EditLayer], blob: bytes,
             state_blob: bytes | None) -> Edit:
    """Stage an edit with its per-module rows and delta; the caller commits (one transaction)."""
    edit.layers = layers
    edit.delta = EditDelta(blob=blob, nbytes=len(blob), state_blob=state_blob)
    session.add(edit)
    session.flush()  # assigns edit.id
    return edit


def set_status(session: Session, edit_id: int, status: str, *, error: str | None = None,
               when: datetime | None = None) -> None:
    edit = session.get(Edit, edit_id)
    if edit is None:
        raise KeyError(edit_id)
    edit.status = status
    if error is not None:
        edit.error = error
    if status == EditStatus.ROLLED_BACK:
        edit.rolled_back_at = when or utcnow()


def add_probe(session: Session, probe: Probe) -> Probe:
    session.add(probe)
    session.flush()
    return probe


def list_probes(session: Session) -> Sequence[Probe]:
    return session.scalars(select(Probe).order_by(Probe.id)).all()


def delete_probe(session: Session, probe_id: int) -> bool:
    probe = session.get(Probe, probe_id)
    if probe is None:
        return False
    session.delete(probe)
    return True
