"""What the OpenAI-compatible routes share: the error shape, usage, and generation with or without streaming.

Existing OpenAI clients and SDKs work unchanged against ``/v1/completions`` and ``/v1/chat/completions``:
the request fields an SDK sends are accepted, the responses have the OpenAI shape, and every error of
these routes (auth, validation, limits) is ``{"error": {"message", "type", "param", "code"}}``, which is
what those clients parse. Generation is the engine's, so an answer sees the edited weights.

Streaming (``stream: true``) sends server-sent events: one ``data: {chunk}`` per piece of text, a last
chunk with the ``finish_reason``, a usage chunk when ``stream_options.include_usage`` is set (as OpenAI
does), then ``data: [DONE]``. The tokens are the non-streaming answer's (the same ``generate`` call, with
a per-token callback), and text is released only once later tokens cannot change it, so the chunks
concatenate to the non-streaming text.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import EngineError, InvalidRequest

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable"}
# engine field names -> the OpenAI request's names
_PARAMS = {"max_new_tokens": "max_tokens", "prompt": "prompt"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
                return openai_error(exc.status_code, exc.detail, _param_of(exc))
            except StarletteHTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
        return route


def _param_of(exc: EngineError) -> str | None:
    param = exc.detail.split(":", 1)[0] if ":" in exc.detail else None
    return _PARAMS.get(param, param)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The fields both completions endpoints share; options this server cannot honour are refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = Field(False, description="server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: StreamOptions | None = None
    # accepted at their neutral values only, so a client that sends them explicitly still works
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    top_p: float = Field(1.0, ge=1.0, le=1.0, description="nucleus sampling is not supported")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = stop_list(v)
        if len(items) > 4 or any(not s for s in items):
            raise ValueError("up to 4 non-empty stop sequences")
        return v

    @property
    def stops(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def check_model(engine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise StarletteHTTPException(404, f"model: {model!r} is not served here; this server serves "
                                          f"{engine.model_name!r} (GET /v1/models)")


def check_max_tokens(engine, max_tokens: int) -> None:
    limit = engine.settings.max_new_tokens
    if max_tokens > limit:
        raise InvalidRequest(f"max_tokens: must be at most {limit} (HIEDIT_MAX_NEW_TOKENS), got {max_tokens}", 400)


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, the stop itself excluded (OpenAI semantics)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _count(engine, text: str) -> int:
    """Tokens of a completion a stop sequence cut short: the kept text, re-tokenised."""
    return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def complete(engine, ids: list[int], max_tokens: int, temperature: float, seed: int | None,
             stops: list[str]) -> tuple[str, int, str]:
    """(text, completion tokens, finish_reason): "length" when max_tokens ran out, else "stop" (EOS or a stop)."""
    text, n = engine.generate(ids, max_tokens, temperature, seed)
    finish = "length" if n >= max_tokens else "stop"  # fewer tokens: the model ended the text (EOS)
    text, stopped = _cut(text, stops)
    if stopped:
        finish, n = "stop", _count(engine, text)
    return text, n, finish


class Detokenizer:
    """The text of a growing token sequence, released only when later tokens cannot change it.

    Held back: a trailing incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)
    and the last ``len(longest stop) - 1`` characters, which could be the start of a stop sequence.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""  # the text released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (possibly ""). Sets ``stopped`` at a stop sequence."""
        self.ids.append(token)
        text, self.stopped = _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        if not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[:max(len(text) - self.hold, 0)]
        return self._release(text)

    def finish(self) -> str:
        """The rest, once no token follows."""
        text, self.stopped = _cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        return self._release(text)

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


_END = object()


def stream(engine, ids: list[int], max_tokens: int, temperature: float, seed: int | None, stops: list[str],
           chunk: Callable[[dict[str, Any], str | None], dict[str, Any]], include_usage: bool,
           first: dict[str, Any] | None = None) -> StreamingResponse:
    """A server-sent-event answer: ``chunk(delta, finish_reason)`` builds each event's body.

    The request was checked before this is called (a refusal is a plain 4xx, never a stream). The
    generation is a row of the decode batch like any other (``service.batching``); a client that
    disconnects cancels it, and the row leaves the batch at the next step.
    ``first``: a delta sent before any text (chat's ``{"role": "assistant"}``).
    """
    engine.check_generation(ids, max_tokens)

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(tokens.put_nowait, item)
            except RuntimeError:  # the loop closed under a cancelled stream: nobody is listening
                cancel.set()

        def run() -> tuple[str, int]:
            try:
                return engine.generate(ids, max_tokens, temperature, seed, on_token=put, cancel=cancel)
            finally:
                put(_END)

        detok = Detokenizer(engine.tokenizer, stops)
        job = loop.run_in_executor(None, run)
        try:
            if first is not None:
                yield sse(chunk(first, None))
            while (item := await tokens.get()) is not _END:
                text = detok.push(item)
                if text:
                    yield sse(chunk(_text_delta(text), None))
                if detok.stopped:
                    cancel.set()  # the rest is never shown: stop decoding it
                    break
            try:
                _, n = await job
            except EngineError as e:
                yield sse(error_body(e.status_code, e.detail, _param_of(e)))
                return
            rest = detok.finish()
            if rest:
                yield sse(chunk(_text_delta(rest), None))
            if detok.stopped:
                finish, n = "stop", _count(engine, detok.sent)
            else:
                finish = "length" if n >= max_tokens else "stop"
            yield sse(chunk({}, finish))
            if include_usage:
                usage = Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)
                yield sse({**chunk({}, None), "choices": [], "usage": usage.model_dump()})
            yield sse("[DONE]")
        finally:
            cancel.set()  # a client gone mid-stream: the generation stops after its current token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _text_delta(text: str) -> dict[str, Any]:
    return {"text": text}
