"""API keys with scopes (DESIGN §4): ``HIEDIT_API_KEYS = "read:k1,edit:k2,admin:k3"``.

Scopes are ordered ``read < edit < admin``; a key grants its scope and every lower one.
Keys arrive as ``Authorization: Bearer <key>`` and are compared in constant time against
every configured key (no early exit, so timing does not reveal which prefix matched).
An edit or rollback records the key's actor: the name given as ``scope:name=key``, else
``key-`` and the first 8 hex digits of the key's sha256.

With no keys configured every request is admin. ``check_bind_allowed`` makes the server
refuse any address but loopback in that case, so an open server is never reachable
from outside the machine.
"""
from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass

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
