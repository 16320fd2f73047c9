"""Who is calling, and may they do this here: API keys and scopes, the edit rate limit, the replica rule.

API keys with scopes (DESIGN §4): ``HIEDIT_API_KEYS = "read:k1,edit:k2,admin:k3"``.

Scopes are ordered ``read < edit < admin``; a key grants its scope and every lower one.
Keys arrive as ``Authorization: Bearer <key>`` and are compared in constant time against
every configured key (no early exit, so timing does not reveal which prefix matched).
An edit or rollback records the key's actor: the name given as ``scope:name=key``, else
``key-`` and the first 8 hex digits of the key's sha256.

With no keys configured every request is admin. ``check_bind_allowed`` makes the server
refuse any address but loopback in that case, so an open server is never reachable
from outside the machine.

The app parses ``HIEDIT_API_KEYS`` once (``app.state.api_keys``); routes only declare
``Depends(require_scope(...))`` (in ``deps``), so adding a route cannot forget the key check
without also forgetting the scope, which the auth-matrix test catches.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

SCOPES = ("read", "edit", "admin")
RANK = {s: i for i, s in enumerate(SCOPES)}


class AuthConfigError(ValueError):
    """HIEDIT_API_KEYS is malformed, or the bind address needs keys that are not configured."""


@dataclass(frozen=True)
class Principal:
    scope: str
    actor: str

    def allows(self, scope: str) -> bool:
        return RANK[self.scope] >= RANK[scope]


ANONYMOUS = Principal("admin", "anonymous")


@dataclass(frozen=True)
class ApiKey:
    scope: str
    actor: str
    secret: bytes


def parse_api_keys(value: str | None) -> list[ApiKey]:
    """``"read:k1,edit:alice=k2"`` -> ApiKeys. Empty or None -> [] (auth off, loopback only)."""
    keys: list[ApiKey] = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        scope, sep, rest = item.partition(":")
        if not sep or scope not in RANK:
            raise AuthConfigError(f"HIEDIT_API_KEYS item {item.split(':')[0]!r}...: expected 'scope:key' "
                                  f"with scope one of {list(SCOPES)}")
        name, eq, secret = rest.partition("=")
        if not eq:
            name, secret = "", rest
        if len(secret) < 8:
            raise AuthConfigError(f"HIEDIT_API_KEYS: a {scope} key is shorter than 8 characters")
        actor = name or "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        keys.append(ApiKey(scope, actor, secret.encode()))
    return keys


def authenticate(keys: list[ApiKey], authorization: str | None) -> Principal | None:
    """The principal for an ``Authorization`` header, or None if it carries no valid key."""
    if not authorization:
        return None
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    presented = token.strip().encode()
    match = None
    for key in keys:  # every key is compared: constant time in which key matched
        if secrets.compare_digest(presented, key.secret):
            match = key
    return Principal(match.scope, match.actor) if match else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(host: str, keys: list[ApiKey]) -> None:
    """Refuse to serve a non-loopback address without API keys."""
    if not keys and not is_loopback(host):
        raise AuthConfigError(f"refusing to bind {host}: no API keys are configured (HIEDIT_API_KEYS), "
                              "so only loopback addresses (127.0.0.1, ::1, localhost) may be served")


class RateLimiter:
    """Token bucket per actor: ``rate`` requests per second, bursts up to ``burst``.

    ``acquire(actor)`` returns 0.0 when the request may go ahead, else the seconds to wait
    (the ``Retry-After`` of a 429). rate <= 0 disables the limit.
    """

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, actor: str, now: float | None = None) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(actor, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[actor] = (tokens - 1.0, now)
                return 0.0
            self._buckets[actor] = (tokens, now)
            return (1.0 - tokens) / self.rate


# ---- FastAPI dependencies: the routes declare them (``deps.require_scope``) ---------------------------

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
