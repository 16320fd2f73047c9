"""POST /v1/completions and GET /v1/models: the OpenAI-compatible subset (DESIGN §4; the shared shape,
errors and streaming are ``service.api.openai_shape``'s)."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field, field_validator

from ...schemas import MAX_TEXT_CHARS
from ..deps import EngineDep, require_scope
from ..openai_shape import OpenAIRequest, OpenAIRoute, Usage, check_max_tokens, check_model, complete, stream

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute,
                   dependencies=[Depends(require_scope("read"))])


class CompletionIn(OpenAIRequest):
    """What an OpenAI SDK sends for a completion."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    # accepted at their neutral values only
    echo: bool = Field(False, description="the prompt is never echoed")
    logprobs: int | None = Field(None, le=0, description="log-probabilities are not returned")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if len(items) != 1:
            raise ValueError(f"exactly one prompt per request, got {len(items)}")
        if not items[0].strip():
            raise ValueError("must not be empty or only whitespace")
        if len(items[0]) > MAX_TEXT_CHARS:
            raise ValueError(f"longer than {MAX_TEXT_CHARS} characters")
        return v

    @field_validator("echo")
    @classmethod
    def _off(cls, v: bool, info) -> bool:
        if v:
            raise ValueError(f"not supported by this server; send {info.field_name}: false or leave it out")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]



class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionOut(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str  # the weights' fingerprint: which edits answered


@router.post("/completions", response_model=CompletionOut)
def create_completion(body: CompletionIn, engine: EngineDep):
    """Continuation of ``prompt``; ``finish_reason`` is "length" when ``max_tokens`` ran out."""
    check_model(engine, body.model)
    check_max_tokens(engine, body.max_tokens)
    ids = engine.check_prompt(body.text)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        fingerprint = engine.fingerprint()  # the weights a stream decodes with: checked before its first token

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": 0, "text": delta.get("text", ""), "logprobs": None,
                                 "finish_reason": finish}]}
        return stream(engine, ids, body.max_tokens, body.temperature, body.seed, body.stops, chunk,
                      body.include_usage)
    text, n, finish = complete(engine, ids, body.max_tokens, body.temperature, body.seed, body.stops)
    return CompletionOut(id=cid, created=created, model=engine.model_name,
                         choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
                         usage=Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n),
                         system_fingerprint=engine.fingerprint())


@router.get("/models")
def list_models(engine: EngineDep) -> dict[str, Any]:
    """The one served model; ``root`` is the base, the active edits are what changed on top of it."""
    return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": engine.started_at,
                                        "owned_by": "hiedit", "root": engine.model_name, "parent": None,
                                        "active_edits": len(engine.state.active_ids)}]}
