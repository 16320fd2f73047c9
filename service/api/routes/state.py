"""GET /state: what the served weights are (DESIGN §3 fingerprint)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ... import crud
from ...schemas import StateOut
from ..deps import EngineDep, SessionDep, require_scope

router = APIRouter(tags=["state"], dependencies=[Depends(require_scope("read"))])


@router.get("/state", response_model=StateOut)
def get_state(engine: EngineDep, session: SessionDep) -> StateOut:
    # What the replica verified is read before the fingerprint: a sync between the two reads then makes the
    # fingerprint newer than the label, never a label that claims a state the fingerprint is not of.
    verified = getattr(engine, "verified", None)
    return StateOut(fingerprint=engine.fingerprint(), base_fingerprint=engine.state.base_fingerprint,
                    model=engine.model_name, active_edits=len(engine.state.active_ids),
                    last_edit_id=crud.last_edit_id(session), methods=sorted(engine.editors),
                    editable_modules=len(engine.state.modules), role=engine.settings.role,
                    lag_edits=getattr(engine, "lag", None), unavailable=dict(engine.unavailable),
                    verified=verified.describe() if verified is not None else None,
                    fingerprint_mismatch=getattr(engine, "mismatch", None))
