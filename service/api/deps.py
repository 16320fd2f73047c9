"""Shared route dependencies: the engine, a database session, and the caller.

Auth plugs in here: every router declares ``Depends(require_scope("read"|"edit"|"admin"))``
and routes that record who did something take ``CurrentActor``. ``current_principal``
(``security``) checks the API key: 401 without a valid one, and ``require_scope`` 403 when
its scope is too small.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from ..engine import EditEngine
from .security import SCOPES, Principal, current_principal

def require_scope(scope: str):
    """Dependency factory: 403 unless the caller's scope includes ``scope`` (read < edit < admin)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.allows(scope):
            raise HTTPException(403, f"Authorization: scope {principal.scope!r} may not do this; needs {scope!r}")
        return principal
    return check


def get_engine(request: Request) -> EditEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "the server is starting: the model is not loaded yet")
    return engine


def get_session(request: Request) -> Iterator[Session]:
    """A session on the log; 503 within HIEDIT_DB_CHECK_TIMEOUT_SECONDS when the database does not answer."""
    engine = getattr(request.app.state, "engine", None)
    reason = engine.reachability.check(max_age=1.0) if engine is not None else None
    if reason is not None:
        raise HTTPException(503, f"database: the edit log is unreachable ({reason}); retry later",
                            headers={"Retry-After": "1"})
    with request.app.state.sessions() as session:
        yield session


def get_actor(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    return principal.actor


EngineDep = Annotated[EditEngine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
CurrentActor = Annotated[str, Depends(get_actor)]
