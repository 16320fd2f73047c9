"""Specificity probes: POST/GET /probes, DELETE /probes/{id}, GET /probes/report."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse

from ... import crud
from ...schemas import MAX_ID, ProbeIn, ProbeList, ProbeOut, ReportOut
from ..deps import EngineDep, SessionDep, require_scope
from ..security import writes_here
from ..serialize import probe_out

router = APIRouter(prefix="/probes", tags=["probes"])


@router.post("", status_code=201, response_model=ProbeOut,
             dependencies=[Depends(require_scope("admin")), Depends(writes_here)])
def create_probe(body: ProbeIn, engine: EngineDep) -> JSONResponse:
    """Record the model's greedy answer to ``prompt`` now; later reports check it is unchanged."""
    probe = engine.add_probe(body.prompt, body.max_new_tokens)
    return JSONResponse(probe_out(probe).model_dump(mode="json"), status_code=201,
                        headers={"Location": f"/probes/{probe.id}"})


@router.get("", response_model=ProbeList, dependencies=[Depends(require_scope("admin"))])
def list_probes(session: SessionDep) -> ProbeList:
    return ProbeList(probes=[probe_out(p) for p in crud.list_probes(session)])


@router.get("/report", response_model=ReportOut, dependencies=[Depends(require_scope("read"))])
async def probe_report(engine: EngineDep,
                       refresh: Annotated[bool, Query(description="recompute now instead of returning the "
                                                                  "latest background report")] = False) -> ReportOut:
    """Specificity and edit retention; computed by the writer at one weight state."""
    if not engine.ready:
        raise HTTPException(503, "the server is not ready: the edit log is still being replayed")
    report = engine.report
    if refresh or report is None:
        report = await asyncio.wrap_future(engine.submit_report())
    return ReportOut(**report.as_dict())


@router.delete("/{probe_id}", status_code=204, dependencies=[Depends(require_scope("admin")), Depends(writes_here)])
def delete_probe(probe_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep) -> Response:
    if not crud.delete_probe(session, probe_id):
        raise HTTPException(404, f"probe_id: no probe {probe_id}")
    session.commit()
    return Response(status_code=204)
