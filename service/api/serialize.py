"""ORM rows -> response models (kept out of the routes so every route renders edits the same way)."""
from __future__ import annotations

from datetime import datetime, timezone

from ..models import Edit, Probe
from ..schemas import EditOut, LayerOut, LayersOut, ProbeOut


def _utc(t: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def edit_out(edit: Edit) -> EditOut:
    return EditOut(id=edit.id, status=edit.status, method=edit.method, model=edit.model, prompt=edit.prompt,
                   target=edit.target, subject=edit.subject, rephrases=list(edit.rephrases or []),
                   locality=list(edit.locality or []), k=edit.k, actor=edit.actor, created_at=_utc(edit.created_at),
                   rolled_back_at=_utc(edit.rolled_back_at), rolled_back_by=edit.rolled_back_by,
                   selected_layers=edit.selected_layers,
                   latency_ms=edit.latency_ms, efficacy=edit.efficacy, loss_before=edit.loss_before,
                   n_tokens=edit.n_tokens, fingerprint_after=edit.fingerprint_after, error=edit.error,
                   info=dict(edit.info or {}))


def layers_out(edit: Edit) -> LayersOut:
    return LayersOut(edit_id=edit.id, method=edit.method, k=edit.k,
                     layers=[LayerOut(index=l.index, module=l.module, importance=l.importance, selected=l.selected,
                                      delta_norm=l.delta_norm, rank=l.rank) for l in edit.layers])


def probe_out(probe: Probe) -> ProbeOut:
    return ProbeOut(id=probe.id, prompt=probe.prompt, max_new_tokens=probe.max_new_tokens, expected=probe.expected,
                    created_at=_utc(probe.created_at))
