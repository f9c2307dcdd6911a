"""One error tree for the broker. Each error knows its HTTP status and machine code; no framework imports."""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Base of every error the broker reports to a client: `detail` is one sentence a person can act on."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "code": self.code}


class BadRequest(BrokerError):
    status_code = 400
    code = "bad_request"


class InvalidQueueName(BadRequest):
    code = "invalid_queue_name"


class ValidationFailed(BrokerError):
    """422: one entry per field in `errors` ({"field", "message"})."""

    status_code = 422
    code = "validation_error"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        first = errors[0]
        super().__init__(f"{first['field']}: {first['message']}")
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return {**super().body(), "errors": self.errors}


class Unauthorized(BrokerError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, detail: str = "Not authenticated", *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(BrokerError):
    status_code = 403
    code = "forbidden"


class NotFound(BrokerError):
    status_code = 404
    code = "not_found"


class QueueNotFound(NotFound):
    code = "queue_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"Queue '{name}' not found", code=None)


class MessageNotFound(NotFound):
    code = "message_not_found"

    def __init__(self, message_id: int) -> None:
        super().__init__(f"Message {message_id} not found")


class UserNotFound(NotFound):
    code = "user_not_found"


class Conflict(BrokerError):
    status_code = 409
    code = "conflict"


class QueueExists(Conflict):
    code = "queue_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"Queue '{name}' already exists")


class UserExists(Conflict):
    code = "user_exists"


class NotProcessing(Conflict):
    code = "not_processing"


class StaleLease(Conflict):
    code = "stale_lease"


class TooLarge(BrokerError):
    status_code = 413
    code = "message_too_large"


class RateLimited(BrokerError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: int, *, code: str | None = None) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(BrokerError):
    """503: a dependency cannot serve right now; the client may retry after `Retry-After` seconds."""

    status_code = 503
    code = "unavailable"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(retry_after)})


class JournalUnavailable(Unavailable):
    code = "journal_unavailable"


class RedisUnavailable(Unavailable):
    code = "redis_unavailable"
