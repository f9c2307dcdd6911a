"""Pure ASGI middleware: request body limits, and request metrics (labelled by route template, never raw path)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.common import JSONResponse
from app.errors import TooLarge
from app.models import Principal

access_log = logging.getLogger("app.access")


class BodyLimit:
    """Refuse request bodies over the limit (413), by Content-Length or while they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                error = self._error()
                await JSONResponse(error.body(), status_code=413)(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> TooLarge:
        return TooLarge(f"The request body is over the limit of {self.max_bytes} bytes", code="body_too_large")


class ObserveRequests:
    """Count, time and log every HTTP request by method, route template and status (metrics, /stats, the
    access log). The log line has the user but never a token, a query string or a body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            record_request(scope.get("state", {}), scope["method"], route, status, time.perf_counter() - started,
                           scope.get("principal"))


def record_request(state: Mapping[str, Any], method: str, route: str, status: int, seconds: float,
                   principal: Principal | None) -> None:
    """Count, time and log one answered request (the metrics, /stats and the access log)."""
    metrics = state.get("metrics")
    if metrics is not None:
        metrics.on_request(method, route, status, seconds)
    settings = state.get("settings")
    if (settings is None or settings.access_log) and access_log.isEnabledFor(logging.INFO):
        user = principal.username if principal else None
        access_log.info("%s %s %d %.1fms user=%s", method, route, status, seconds * 1000, user or "-",
                        extra={"method": method, "route": route, "status": status,
                               "duration_ms": round(seconds * 1000, 3), "user": user})
