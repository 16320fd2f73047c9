"""The FastAPI application: lifespan (migrate, load, replay), error shapes and body guards.

``create_app(settings)`` is all a test or ``hiedit serve`` needs. Every error is
``{"detail": "<field>: <rule>"}`` with a 4xx status; a 500 means a bug, never bad input.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import db
from .api.router import api_router
from .api.security import RateLimiter, parse_api_keys
from .engine import EditEngine
from .engine.errors import BaseModelMismatch, EngineError
from .loading import ConfigError, load_all
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("hiedit.service")


# ---- body guard ----------------------------------------------------------------------------------

class BodyGuard:
    """413 for bodies over ``max_bytes``; 400 for bodies or query strings that are not UTF-8.

    Why here and not in the routes: the JSON parser would turn bad bytes into a generic
    "error parsing the body", and a huge body would be read whole before any route ran.
    The body is buffered (it is small by construction) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bad = _bad_query_param(scope.get("query_string", b""))
        if bad is not None:
            await _send_json(send, 400, {"detail": f"{bad}: query parameter is not valid UTF-8"})
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    await _send_json(send, 413, {"detail": f"body: {int(length)} bytes, over the limit of "
                                                           f"{self.max_bytes} (HIEDIT_MAX_BODY_BYTES)"})
                    return
            except ValueError:
                await _send_json(send, 400, {"detail": "Content-Length: not an integer"})
                return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _send_json(send, 413, {"detail": f"body: over the limit of {self.max_bytes} bytes "
                                                       "(HIEDIT_MAX_BODY_BYTES)"})
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            await _send_json(send, 400, {"detail": f"body: not valid UTF-8 (byte {e.start}); send JSON in UTF-8"})
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _bad_query_param(qs: bytes) -> str | None:
    """Name of the first query parameter whose percent-decoded bytes are not UTF-8, else None."""
    for part in qs.split(b"&"):
        name, _, value = part.partition(b"=")
        for piece in (name, value):
            try:
                unquote_to_bytes(piece.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return unquote_to_bytes(name).decode("utf-8", "replace") or "query"
    return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    import json
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# ---- error shapes ------------------------------------------------------------------------------

def _field(loc: tuple) -> str:
    """('body', 'locality', 0, 'prompt') -> 'locality[0].prompt'."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or (str(loc[0]) if loc else "body")


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict]]:
    items = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = tuple(err.get("loc", ()))
        field = _field(loc)
        if err.get("type") == "json_invalid":  # loc is ('body', <character offset>)
            field = "body"
            msg = f"invalid JSON at character {loc[-1]}: {err.get('ctx', {}).get('error', msg)}"
        items.append({"field": field, "msg": msg, "type": err.get("type")})
    return "; ".join(f"{i['field']}: {i['msg']}" for i in items), items


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_detail(exc)
        return JSONResponse({"detail": detail, "errors": items}, status_code=422)

    @app.exception_handler(EngineError)
    async def _engine(_request: Request, exc: EngineError) -> JSONResponse:
        if exc.status_code == 500:  # 503 (method unavailable) is the client's business, not an error here
            log.error("engine error: %s", exc.detail)
        headers = {"Retry-After": "1"} if exc.status_code == 503 else None
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    async def _database(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if not db.is_unavailable(exc):
            log.exception("database error")
            return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
        log.warning("database unreachable: %s", db.describe(exc))
        return JSONResponse({"detail": f"database: the edit log is unreachable ({db.describe(exc)}); retry later"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


# ---- the app -------------------------------------------------------------------------------------

def create_app(settings: Settings | None = None, components=None, coordinator=None) -> FastAPI:
    """The service app. ``components`` = (model, tokenizer, editors, unavailable) skips loading (tests, bench).

    ``coordinator``: a ``service.coordination.Coordinator`` whose writer lock the caller already
    holds (``hiedit serve`` takes it before loading anything, to fail fast); without one and with
    ``settings.redis_url``, the app connects (and a writer takes the lock) at startup.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        coord = coordinator
        if coord is None and settings.redis_url:
            from .coordination import Coordinator
            coord = Coordinator(settings.redis_url, settings.redis_prefix, settings.writer_lock_ttl_seconds)
            if settings.role == "writer":
                await asyncio.to_thread(coord.acquire_writer_lock)
        app.state.coordinator = coord
        sql = db.make_engine(settings.resolved_database_url)
        try:
            if settings.role == "writer":  # replicas read the log; the writer (or the entrypoint) migrates it
                try:
                    await asyncio.to_thread(db.upgrade, sql)
                except Exception as e:  # a log a migration refuses (0004: an unknown status) names its rows
                    app.state.startup_failure = f"migrating the edit log failed: {e}"
                    raise
            app.state.sessions = db.make_sessionmaker(sql)
            try:
                loaded = components or await asyncio.to_thread(load_all, settings)
            except ConfigError as e:  # e.g. --rlsedit on with overlapping editors: the reason, not a traceback
                app.state.startup_failure = str(e)
                raise
            model, tokenizer, editors, unavailable = loaded
            args = (settings, model, tokenizer, editors, unavailable, app.state.sessions, app.state.metrics)
            if settings.role == "replica":
                from .replica import ReplicaEngine
                engine = ReplicaEngine(*args, coordinator=coord)
            else:
                engine = EditEngine(*args)
                engine.coordinator = coord
            await _refuse_another_base_model(app, engine)
            app.state.engine = engine
            engine.start()  # replays (or, on a replica, syncs) the log on the writer thread; then /readyz is 200
            log.info("serving %s as %s with methods %s", engine.model_name, settings.role, sorted(editors) or "none")
            try:
                yield
            finally:
                engine.stop()
        finally:
            sql.dispose()
            if coord is not None:
                coord.close()  # releases the writer lock: a new writer can start at once

    app = FastAPI(title="hiedit", version="0.1.0", lifespan=lifespan,
                  description="Edit facts inside a served LLM: edits, audit, rollback, probes, metrics.")
    app.state.settings = settings
    app.state.api_keys = parse_api_keys(settings.api_keys)  # AuthConfigError for a malformed HIEDIT_API_KEYS
    app.state.edit_limiter = (RateLimiter(settings.edit_rate_per_second, settings.edit_burst)
                              if settings.edit_rate_per_second > 0 else None)
    app.state.metrics = Metrics()
    app.state.engine = None
    app.state.coordinator = coordinator
    app.state.startup_failure = None  # why the lifespan refused to start (hiedit serve prints it, exits 2)
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    app.add_middleware(StartupFailureMessage)
    return app


async def _refuse_another_base_model(app: FastAPI, engine: EditEngine) -> None:
    """Fail the start (before the replay, which stays asynchronous) when the log belongs to another base model.

    The weights are loaded by now (the check compares their fingerprint). Only BaseModelMismatch stops
    the start here; any other failure to read the log is left to the replay, which reports it on /readyz
    as before (a replica may start before its database is reachable).
    """
    try:
        await asyncio.to_thread(engine.check_base_model)
    except BaseModelMismatch as e:
        app.state.startup_failure = e.detail
        raise
    except Exception as e:  # noqa: BLE001 - the replay checks again and reports what went wrong
        log.warning("base model check deferred to the replay: %s", db.describe(e))


class StartupFailureMessage:
    """A refused start (``app.state.startup_failure``) is logged as its one-line reason, not a traceback.

    Starlette reports an exception of the lifespan to the server as ``lifespan.startup.failed`` with
    the formatted traceback, which uvicorn logs; the reason alone is what an operator needs.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_reason(message: Message) -> None:
            failure = getattr(scope["app"].state, "startup_failure", None) if "app" in scope else None
            if message["type"] == "lifespan.startup.failed" and failure:
                message = {**message, "message": failure}
            await send(message)

        await self.app(scope, receive, send_reason)
