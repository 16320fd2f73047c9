"""POST /v1/completions and GET /v1/models: the OpenAI-compatible subset (DESIGN §4).

Existing OpenAI clients and SDKs work unchanged: the request fields an SDK sends for a plain
completion are accepted, the response has the OpenAI shape, and every error of these routes
(auth, validation, limits) is ``{"error": {"message", "type", "param", "code"}}``, which is what
those clients parse. Generation is the engine's, so a completion sees the edited weights.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine import EngineError
from ...schemas import MAX_TEXT_CHARS
from ..deps import EngineDep, require_scope

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """Renders every error of the route (dependencies included) in the OpenAI shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                err = exc.errors()[0]
                loc = [str(p) for p in err.get("loc", ()) if p != "body"]
                param = ".".join(loc) or None
                msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
                if err.get("type") == "json_invalid":
                    param, msg = None, "the body is not valid JSON"
                return openai_error(400, f"{param}: {msg}" if param else msg, param, err.get("type"))
            except EngineError as exc:
                param = exc.detail.split(":", 1)[0] if ":" in exc.detail else None
                return openai_error(exc.status_code, exc.detail, _PARAMS.get(param, param))
            except StarletteHTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
        return route


# engine field names -> the OpenAI request's names
_PARAMS = {"max_new_tokens": "max_tokens", "prompt": "prompt"}

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
    stream: bool = Field(False, description="streaming is not supported")
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

    @field_validator("stream", "echo")
    @classmethod
    def _off(cls, v: bool, info) -> bool:
        if v:
            raise ValueError(f"not supported by this server; send {info.field_name}: false or leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("up to 4 non-empty stop sequences")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionOut(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str  # the weights' fingerprint: which edits answered


def _check_model(engine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise StarletteHTTPException(404, f"model: {model!r} is not served here; this server serves "
                                          f"{engine.model_name!r} (GET /v1/models)")


@router.post("/completions", response_model=CompletionOut)
def create_completion(body: CompletionIn, engine: EngineDep) -> CompletionOut:
    """Continuation of ``prompt``; ``finish_reason`` is "length" when ``max_tokens`` ran out."""
    _check_model(engine, body.model)
    limit = engine.settings.max_new_tokens
    if body.max_tokens > limit:
        raise EngineError(f"max_tokens: must be at most {limit} (HIEDIT_MAX_NEW_TOKENS), got {body.max_tokens}", 400)
    prompt_ids = engine.check_prompt(body.text)
    text, n = engine.generate(body.text, body.max_tokens, body.temperature, body.seed)
    finish = "length" if n >= body.max_tokens else "stop"  # fewer tokens: the model ended the text (EOS)
    cuts = [i for i in (text.find(s) for s in body.stops) if i >= 0]
    if cuts:  # a stop sequence ends the text there, itself excluded (OpenAI semantics)
        text, finish = text[:min(cuts)], "stop"
        n = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    return CompletionOut(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=engine.model_name,
                         choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
                         usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=n,
                                     total_tokens=len(prompt_ids) + n),
                         system_fingerprint=engine.fingerprint())


@router.get("/models")
def list_models(engine: EngineDep) -> dict[str, Any]:
    """The one served model; ``root`` is the base, the active edits are what changed on top of it."""
    return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": engine.started_at,
                                        "owned_by": "hiedit", "root": engine.model_name, "parent": None,
                                        "active_edits": len(engine.state.active_ids)}]}
