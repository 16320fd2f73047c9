"""Who is calling, and may they do this here: API keys, the edit rate limit, the replica rule.

The app parses ``HIEDIT_API_KEYS`` once (``app.state.api_keys``); routes only declare
``Depends(require_scope(...))`` (in ``deps``), so adding a route cannot forget the key check
without also forgetting the scope, which the auth-matrix test catches.
"""
from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from ..auth import ANONYMOUS, Principal, authenticate

BEARER = {"WWW-Authenticate": "Bearer"}


def current_principal(request: Request) -> Principal:
    """The caller's key; with no keys configured (loopback only) the caller is the operator."""
    keys = getattr(request.app.state, "api_keys", None)
    if not keys:
        return ANONYMOUS
    header = request.headers.get("authorization")
    principal = authenticate(keys, header)
    if principal is None:
        why = "missing" if not header else "not a valid key (expected 'Bearer <key>' with a key of HIEDIT_API_KEYS)"
        raise HTTPException(401, f"Authorization: {why}", headers=BEARER)
    return principal


def limit_edit_rate(request: Request, principal: Annotated[Principal, Depends(current_principal)]) -> None:
    """429 with Retry-After when this key sends edits faster than HIEDIT_EDIT_RATE_PER_SECOND."""
    limiter = getattr(request.app.state, "edit_limiter", None)
    if limiter is None:
        return
    wait = limiter.acquire(principal.actor)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise HTTPException(429, f"rate limit: at most {limiter.rate:g} edits per second per key "
                                 f"(HIEDIT_EDIT_RATE_PER_SECOND, bursts of {limiter.burst}); retry after {retry} s",
                            headers={"Retry-After": str(retry)})


def writes_here(request: Request) -> None:
    """409 on a replica: it serves the log, only the writer changes it. 503 on a writer that lost
    its Redis lock: another writer may be live, and two writers must never append to one log."""
    settings = request.app.state.settings
    if settings.role == "replica":
        where = settings.writer_url or "(HIEDIT_WRITER_URL is not set)"
        raise HTTPException(409, f"this is a replica; send writes to the writer at {where}")
    coordinator = getattr(request.app.state, "coordinator", None)
    if coordinator is not None and coordinator.lock_lost:
        if coordinator.lock_taken:
            raise HTTPException(503, "this writer lost its Redis writer lock to another process and refuses "
                                     "writes; restart it")
        raise HTTPException(503, "this writer lost its Redis writer lock (Redis is unreachable) and refuses "
                                 "writes until it can take the lock back", headers={"Retry-After": "1"})
