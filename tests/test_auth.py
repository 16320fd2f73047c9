"""API-key parsing, constant-time authentication, the loopback rule and the edit rate limit."""
from __future__ import annotations

import pytest

from service.api.security import (ANONYMOUS, AuthConfigError, RateLimiter, authenticate, check_bind_allowed,
                                  parse_api_keys)

KEYS = "read:reader-key-1,edit:alice=editor-key-2,admin:admin-key-3"


def test_parse_and_authenticate_each_scope():
    keys = parse_api_keys(KEYS)
    assert [k.scope for k in keys] == ["read", "edit", "admin"]
    reader = authenticate(keys, "Bearer reader-key-1")
    editor = authenticate(keys, "bearer editor-key-2")
    admin = authenticate(keys, "Bearer admin-key-3")
    assert reader.scope == "read" and reader.actor.startswith("key-") and len(reader.actor) == 12
    assert editor.actor == "alice"
    assert reader.allows("read") and not reader.allows("edit")
    assert editor.allows("edit") and not editor.allows("admin")
    assert admin.allows("read") and admin.allows("edit") and admin.allows("admin")
    assert ANONYMOUS.allows("admin")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic admin-key-3", "Bearer admin-key-",
                                    "Bearer admin-key-33", "admin-key-3"])
def test_invalid_credentials_give_no_principal(header):
    assert authenticate(parse_api_keys(KEYS), header) is None


@pytest.mark.parametrize("value,words", [("root:abcdefgh", "scope"), ("admin", "scope:key"),
                                         ("edit:short", "shorter than 8")])
def test_malformed_key_config_is_refused(value, words):
    with pytest.raises(AuthConfigError, match=words):
        parse_api_keys(value)


def test_no_keys_means_loopback_only():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind_allowed(host, [])
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com"):
        with pytest.raises(AuthConfigError, match="refusing to bind"):
            check_bind_allowed(host, [])
    check_bind_allowed("0.0.0.0", parse_api_keys(KEYS))


def test_rate_limiter_bursts_then_asks_to_retry():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a", now=100.0)
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("b", now=100.0) == 0.0  # per actor
    assert limiter.acquire("a", now=100.6) == 0.0  # refilled
    assert RateLimiter(rate=0, burst=1).acquire("a") == 0.0
