"""POST /v1/completions and GET /v1/models: the OpenAI-compatible subset (DESIGN §4; the shared shape,
errors and streaming are ``service.api.openai_shape``'s)."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...schemas import MAX_TEXT_CHARS
from ..deps import EngineDep, require_scope
from ..openai_shape import (OpenAIRoute, StreamOptions, Usage, check_max_tokens, check_model, complete, stop_list,
                            stream, validate_stop)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute,
                   dependencies=[Depends(require_scope("read"))])


class CompletionIn(BaseModel):
    """What an OpenAI SDK sends for a completion; options this server cannot honour are refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    # accepted at their neutral values only, so a client that sends them explicitly still works
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = Field(False, description="server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="the prompt is never echoed")
    logprobs: int | None = Field(None, le=0, description="log-probabilities are not returned")
    top_p: float = Field(1.0, ge=1.0, le=1.0, description="nucleus sampling is not supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    user: str | None = None

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

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        return validate_stop(v)

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
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream(engine, ids, body.max_tokens, body.temperature, body.seed, stop_list(body.stop), chunk,
                      include_usage)
    text, n, finish = complete(engine, ids, body.max_tokens, body.temperature, body.seed, stop_list(body.stop))
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
