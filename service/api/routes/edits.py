"""POST/GET /edits, GET /edits/{id}, GET /edits/{id}/layers, POST /edits/{id}/rollback."""
from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query
from fastapi.responses import JSONResponse

from ... import crud
from ...engine.edits import EditSpec
from ...schemas import MAX_ID, EditIn, EditList, EditOut, LayersOut
from ..deps import CurrentActor, EngineDep, SessionDep, require_scope
from ..security import limit_edit_rate, writes_here
from ..serialize import edit_out, layers_out

router = APIRouter(prefix="/edits", tags=["edits"])

StatusFilter = Literal["applied", "rolled_back", "failed"]
EditId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post("", status_code=201, response_model=EditOut,
             dependencies=[Depends(require_scope("edit")), Depends(writes_here), Depends(limit_edit_rate)],
             responses={200: {"description": "replay of an earlier request with the same Idempotency-Key"},
                        409: {"description": "Idempotency-Key reused with a different body, or a replica"},
                        429: {"description": "this key sends edits too fast; see Retry-After"},
                        422: {"description": "invalid request, or the edit was refused by the guard"},
                        503: {"description": "the method is not available on this server"}})
async def create_edit(body: EditIn, engine: EngineDep, actor: CurrentActor,
                      idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                                     max_length=255)] = None) -> JSONResponse:
    """Queue the edit for the single writer and answer once it is logged, applied and scored."""
    spec = EditSpec(prompt=body.prompt, target=body.target, rephrases=list(body.rephrases),
                    locality=[loc.model_dump() for loc in body.locality], method=body.method, k=body.k,
                    subject=body.subject)
    edit, created = await asyncio.wrap_future(engine.submit_edit(spec, idempotency_key, actor))
    return JSONResponse(edit_out(edit).model_dump(mode="json"), status_code=201 if created else 200,
                        headers={"Location": f"/edits/{edit.id}"})


@router.get("", response_model=EditList, dependencies=[Depends(require_scope("read"))])
def list_edits(session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
               offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0, status: StatusFilter | None = None) -> EditList:
    """Newest first."""
    edits = crud.list_edits(session, limit, offset, status)
    return EditList(edits=[edit_out(e) for e in edits], total=crud.count_edits(session, status),
                    limit=limit, offset=offset)


@router.get("/{edit_id}", response_model=EditOut, dependencies=[Depends(require_scope("read"))])
def get_edit(edit_id: EditId, session: SessionDep) -> EditOut:
    return edit_out(_edit_or_404(session, edit_id))


@router.get("/{edit_id}/layers", response_model=LayersOut, dependencies=[Depends(require_scope("read"))])
def get_edit_layers(edit_id: EditId, session: SessionDep) -> LayersOut:
    """Audit: every editable module of the edit's method, its importance, selection, ‖ΔW‖_F and rank."""
    return layers_out(_edit_or_404(session, edit_id))


def _edit_or_404(session, edit_id: int):
    edit = crud.get_edit(session, edit_id)
    if edit is None:
        raise HTTPException(404, f"edit_id: no edit {edit_id}")
    return edit


ROLLBACK_DESCRIPTION = (
    "Removes the edit's delta: the served weights become W⁰ plus the stored deltas of the other active edits, in "
    "id order, bit for bit what a fresh replay of the log without this edit builds. For an RLSEdit edit it also "
    "removes the edit's keys from RLSEdit's history C (the inverse then covers exactly the other edits' keys). "
    "It does not recompute the later RLSEdit edits: their deltas were computed with this edit's keys in C and "
    "its change in the weights, so the weights are not the RLS solution RLSEdit would reach for the remaining "
    "edits made without this one (measured on 50 edits: docs/rlsedit.md, Rollback). To get that, roll back the "
    "later RLSEdit edits too and submit them again.")


@router.post("/{edit_id}/rollback", response_model=EditOut, description=ROLLBACK_DESCRIPTION,
             dependencies=[Depends(require_scope("edit")), Depends(writes_here)],
             responses={404: {"description": "no such edit"},
                        409: {"description": "not an applied edit, or a replica"}})
async def rollback_edit(edit_id: EditId, engine: EngineDep, actor: CurrentActor) -> EditOut:
    edit = await asyncio.wrap_future(engine.submit_rollback(edit_id, actor))
    return edit_out(edit)
