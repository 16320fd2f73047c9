"""GET /healthz (liveness: the process answers) and GET /readyz (model loaded and log replayed)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"detail": "loading the model"}, status_code=503)
    if engine.startup_error:
        return JSONResponse({"detail": engine.startup_error}, status_code=503)
    if not engine.ready:
        return JSONResponse({"detail": "replaying the edit log"}, status_code=503)
    mismatch = getattr(engine, "mismatch", None)  # a replica whose weights differ from the writer's
    if mismatch is not None:
        return JSONResponse({k: mismatch[k] for k in ("detail", "edit_id", "event", "expected_fingerprint",
                                                      "fingerprint")}, status_code=503)
    return JSONResponse({"status": "ready", "active_edits": len(engine.state.active_ids)})
