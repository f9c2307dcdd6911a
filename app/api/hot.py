"""The message hot path as pure ASGI: publish, batch publish, consume, ack, nack and extend.

These routes carry nearly all of a broker's traffic. Through Starlette's router, Request and exception middleware
and our two middlewares, each request paid for five layers of wrappers around ~50 us of its own work; here one
function does what those layers did for them (routing, the body limit, authentication, errors as JSON, metrics
and the access log) and calls the same handlers (api/messages.py) and broker methods as everything else. Any
other request goes on to the Starlette app unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import messages
from app.api.common import AppState, Call, Reply, bearer, require_role
from app.api.middleware import record_request
from app.errors import BrokerError, TooLarge
from app.models import Principal, Role

log = logging.getLogger(__name__)
Handler = Callable[[Call, Principal], Awaitable[Reply]]
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class HotRoute:
    path: str  # the template, as metrics, logs and the OpenAPI document name the route
    method: str
    handler: Handler
    roles: tuple[Role, ...]


ROUTES = (
    HotRoute("/queues/{queue}/messages", "POST", messages.publish, (Role.PRODUCER,)),
    HotRoute("/queues/{queue}/messages/batch", "POST", messages.publish_batch, (Role.PRODUCER,)),
    HotRoute("/queues/{queue}/messages/consume", "GET", messages.consume_one, (Role.CONSUMER,)),
    HotRoute("/queues/{queue}/messages/consume", "POST", messages.consume_many, (Role.CONSUMER,)),
    HotRoute("/messages/{message_id}/ack", "POST", messages.ack, (Role.CONSUMER,)),
    HotRoute("/messages/{message_id}/nack", "POST", messages.nack, (Role.CONSUMER,)),
    HotRoute("/messages/{message_id}/extend", "POST", messages.extend, (Role.CONSUMER,)),
)
# A route's path without its parameter, e.g. ("queues", "messages", "batch"); the templates above have one each.
_SHAPES: dict[tuple[str, ...], dict[str, HotRoute]] = {}
for _route in ROUTES:
    _shape = tuple(part for part in _route.path.split("/")[1:] if not part.startswith("{"))
    _SHAPES.setdefault(_shape, {})[_route.method] = _route
# Paths whose other methods Starlette serves (GET /queues/{queue}/messages lists a queue's messages).
_STARLETTE_METHODS: dict[tuple[str, ...], tuple[str, ...]] = {("queues", "messages"): ("GET", "HEAD")}


def match(path: str) -> tuple[tuple[str, ...], dict[str, HotRoute], str] | None:
    """A path's shape, its hot routes by method, and its parameter; None for a path they do not serve."""
    parts = path.split("/")  # "/queues/q/messages/batch" -> ["", "queues", "q", "messages", "batch"]
    if len(parts) < 4 or parts[0] or not parts[2]:
        return None
    shape = (parts[1], *parts[3:])
    methods = _SHAPES.get(shape)
    return (shape, methods, parts[2]) if methods is not None else None


class HotPath:
    """ASGI middleware: serves the hot routes itself, passes everything else to `app`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = match(_route_path(scope))
            if found is not None:
                shape, methods, param = found
                route = methods.get(scope["method"])
                if route is not None:
                    await self._serve(route, param, scope, receive, send)
                    return
                elsewhere = _STARLETTE_METHODS.get(shape, ())
                if scope["method"] not in elsewhere:
                    await self._not_allowed([*methods, *elsewhere], methods, scope, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, route: HotRoute, param: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state: AppState = scope["state"]
        status, principal, headers = 500, None, JSON_HEADERS
        try:
            try:
                self._check_declared_length(scope)
                principal = bearer(state["tokens"], _header(scope, b"authorization") or "")
                require_role(principal, route.roles)
                body = await self._read_body(receive)
                status, value = await route.handler(Call(state, param, scope["headers"], scope["query_string"],
                                                         body), principal)
                content = orjson.dumps(value)
            except BrokerError as exc:
                status, content = exc.status_code, orjson.dumps(exc.body())
                headers = JSON_HEADERS + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                          for k, v in exc.headers.items()]
            except _Disconnected:
                status = 499  # the client went away before its request was whole: nobody to answer
                return
            except Exception:
                log.exception("unhandled error on %s %s", scope["method"], route.path)
                status, content = 500, b'{"detail":"Internal error; it was logged","code":"internal_error"}'
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-length", b"%d" % len(content))]})
            await send({"type": "http.response.body", "body": content})
        finally:
            record_request(state, scope["method"], route.path, status, time.perf_counter() - started, principal)

    def _check_declared_length(self, scope: Scope) -> None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()

    async def _read_body(self, receive: Receive) -> bytes:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > self.max_body_bytes:
                raise self._too_large()
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _too_large(self) -> TooLarge:
        return TooLarge(f"The request body is over the limit of {self.max_body_bytes} bytes", code="body_too_large")

    async def _not_allowed(self, allowed: list[str], methods: dict[str, HotRoute], scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        path = next(iter(methods.values())).path
        content = b'{"detail":"Method not allowed on this route","code":"method_not_allowed"}'
        allow = ", ".join(sorted(allowed)).encode()
        await send({"type": "http.response.start", "status": 405,
                    "headers": [*JSON_HEADERS, (b"allow", allow), (b"content-length", b"%d" % len(content))]})
        await send({"type": "http.response.body", "body": content})
        record_request(scope["state"], scope["method"], path, 405, time.perf_counter() - started, None)


class _Disconnected(Exception):
    pass


def _route_path(scope: Scope) -> str:
    """The path without the app's root path, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def operations() -> set[tuple[str, str]]:
    """(path template, method) of every hot route, for the route table's documentation and its test."""
    return {(route.path, route.method) for route in ROUTES}


__all__ = ["ROUTES", "HotPath", "HotRoute", "match", "operations"]
