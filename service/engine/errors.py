"""The engine's errors: each carries the HTTP status the API answers with (``service.main``'s handler)."""
from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """An error with an HTTP status and a message that names the field and the rule."""

    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        if status_code is not None:
            self.status_code = status_code


class InvalidRequest(EngineError):
    """422: a field breaks a rule the schema cannot check (token limits, k, the delta guard)."""

    status_code = 422


InvalidEdit = InvalidRequest


class LogSettingsMismatch(EngineError):
    """503: the edit log was written under editor settings this server does not have (its modules differ)."""

    status_code = 503


class BaseModelMismatch(EngineError):
    """503: the edit log was written for another base model; the server must not start (nothing is replayed)."""

    status_code = 503


class NotFound(EngineError):
    status_code = 404


class Conflict(EngineError):
    status_code = 409


class Unavailable(EngineError):
    status_code = 503
