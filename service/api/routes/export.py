"""POST /export: the active edits (or chosen ones) as a merged model or a PEFT LoRA adapter under HIEDIT_HOME."""
from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engine.errors import Unavailable
from ...export import export
from ..deps import EngineDep, require_scope

router = APIRouter(tags=["export"], dependencies=[Depends(require_scope("admin"))])

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["merged", "peft"]
    edits: list[int] | None = Field(None, description="edit ids to export (default: every applied edit)")
    rank: int | None = Field(None, ge=1, description="peft only: truncate each module's update to this rank (SVD)")
    name: str | None = Field(None, description="directory name under HIEDIT_HOME/exports (default: "
                             "<format>-<unix time>-<fingerprint prefix>)")
    overwrite: bool = False

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v


class ExportOut(BaseModel):
    path: str
    format: str
    model: str
    edits: list[int]
    fingerprint: str
    base_fingerprint: str
    rank: int | None
    exact_rank: int | None
    errors: dict[str, float]
    seconds: float


@router.post("/export", response_model=ExportOut)
def post_export(body: ExportIn, engine: EngineDep) -> ExportOut:
    """Write the export on this server's disk and return where, with the fingerprint of the weights it holds.

    Runs beside serving (it reads W⁰ and the log, never the write lock); a merged SmolLM2 is ~0.5 GB.
    """
    if not engine.ready:
        raise Unavailable("the server is not ready: the edit log is still being replayed")
    root = engine.settings.home / "exports"
    root.mkdir(parents=True, exist_ok=True)
    name = body.name or f"{body.format}-{int(time.time())}-{engine.fingerprint()[:12]}"
    result = export(engine, body.format, root / name, body.edits, body.rank, body.overwrite)
    return ExportOut(**result.as_dict())
