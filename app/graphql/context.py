"""What every GraphQL operation shares: the caller, authenticated as in REST, and REST's error codes.

HTTP: the bearer token in the Authorization header, checked before the body is read, so a request without a valid
one is REST's 401. WebSocket (graphql-transport-ws): the token in the `connection_init` payload
(`{"Authorization": "Bearer <token>"}`) or the handshake's Authorization header; without a valid one the
connection is closed with 4403, the protocol's "Forbidden", and no operation runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from ariadne.asgi.handlers import GraphQLHTTPHandler, GraphQLTransportWSHandler
from ariadne.asgi.handlers.graphql_transport_ws import ClientContext
from ariadne.exceptions import HttpError
from ariadne.format_error import get_error_extension
from ariadne.utils import unwrap_graphql_error
from graphql import GraphQLError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from app.api.common import AppState, JSONResponse, authenticate
from app.broker import Broker
from app.errors import BadRequest, BrokerError, Forbidden, Unauthorized, ValidationFailed
from app.fanout import EventHub
from app.models import Principal, Role
from app.settings import Settings

INTROSPECTION_DISABLED = "introspection is disabled"  # ariadne's IntrospectionDisabledRule says so
CONNECTION_INIT_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class GraphQLContext:
    """`info.context` of every resolver: who calls, and the lifespan's state."""

    principal: Principal
    state: AppState

    @property
    def broker(self) -> Broker:
        return self.state["broker"]

    @property
    def hub(self) -> EventHub:
        return self.state["hub"]

    @property
    def settings(self) -> Settings:
        return self.state["settings"]

    def require(self, *roles: Role) -> Principal:
        """The caller, if it holds one of `roles` (admin holds all); else REST's 403."""
        if roles and not self.principal.has_any(*roles):
            raise Forbidden(f"This call needs the {' or '.join(r.value for r in roles)} role")
        return self.principal


def context_value(connection: HTTPConnection, data: Any) -> GraphQLContext:
    """ariadne's `context_value`: the principal was verified when the request or connection came in."""
    principal = connection.scope.get("principal")
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return GraphQLContext(principal, cast(AppState, connection.scope["state"]))


def authenticate_connection(websocket: WebSocket, payload: Any) -> Principal:
    """The `connection_init` payload's Authorization, else the handshake's header; verified as REST does."""
    given = (payload.get("Authorization") or payload.get("authorization")) if isinstance(payload, dict) else None
    header = given if isinstance(given, str) else websocket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Not authenticated: send {\"Authorization\": \"Bearer <token>\"} in connection_init")
    return cast(AppState, websocket.scope["state"])["tokens"].verify(token.strip(), "access")


class HttpHandler(GraphQLHTTPHandler):
    """ariadne's HTTP handler with REST's answers for what is not a GraphQL result: 401 before anything else,
    JSON `{"detail", "code"}` bodies for bad requests and other methods."""

    async def handle_request_override(self, request: Request) -> Response | None:
        if request.method == "POST":
            request.scope["principal"] = authenticate(request)  # raises Unauthorized: the app answers 401
        return None

    async def extract_data_from_request(self, request: Request) -> Any:
        try:
            return await super().extract_data_from_request(request)
        except HttpError as exc:
            raise BadRequest(exc.message or "Not a GraphQL request", code="invalid_request") from None

    async def create_json_response(self, request: Request, result: dict[str, Any], success: bool) -> Response:
        # GraphQL over HTTP (application/json): 200 whenever the operation ran, even with errors in the result;
        # 400 when it could not run (no "data": syntax, validation, limits).
        return JSONResponse(result, status_code=200 if "data" in result else 400)

    def handle_not_allowed_method(self, request: Request) -> Response:
        allowed: Response = super().handle_not_allowed_method(request)
        if request.method == "OPTIONS":
            return allowed
        return JSONResponse({"detail": "Method not allowed on this route", "code": "method_not_allowed"},
                            status_code=405, headers={"Allow": allowed.headers["allow"]})


class WebSocketHandler(GraphQLTransportWSHandler):
    """graphql-transport-ws, authenticating `connection_init` before ariadne acknowledges it."""

    def __init__(self) -> None:
        super().__init__(connection_init_wait_timeout=CONNECTION_INIT_TIMEOUT)

    async def handle_websocket_connection_init_message(
        self, websocket: WebSocket, message: dict[str, Any], client_context: ClientContext
    ) -> None:
        if not client_context.connection_init_received:  # a second one is ariadne's to refuse (4429)
            try:
                websocket.scope["principal"] = authenticate_connection(websocket, message.get("payload"))
            except BrokerError as exc:
                await websocket.close(code=4403, reason=exc.code)
                return
        await super().handle_websocket_connection_init_message(websocket, message, client_context)


# -- errors: REST's code in extensions, never a traceback unless debug ----------------------------------------------


def format_error(error: GraphQLError, debug: bool = False) -> dict[str, Any]:
    formatted: dict[str, Any] = dict(error.formatted)
    extensions: dict[str, Any] = dict(formatted.get("extensions") or {})
    original = unwrap_graphql_error(error)
    if isinstance(original, BrokerError):
        body = _camel_case_fields(original)
        formatted["message"] = body["detail"]
        extensions.update({k: v for k, v in body.items() if k != "detail"})
        if "Retry-After" in original.headers:
            extensions["retryAfter"] = int(original.headers["Retry-After"])
    elif is_client_error(error):  # the request itself: syntax, validation, variables, limits
        extensions.setdefault("code", _request_error_code(error, extensions))
    else:  # a fault of ours: ariadne logs it with its traceback; the client learns nothing of it
        formatted["message"] = "Internal error; it was logged"
        extensions["code"] = "internal_error"
        if debug:
            extensions["exception"] = get_error_extension(error)
    formatted["extensions"] = extensions
    return formatted


def _request_error_code(error: GraphQLError, extensions: dict[str, Any]) -> str:
    if "cost" in extensions:  # ariadne's cost validator
        return "query_too_expensive"
    if INTROSPECTION_DISABLED in error.message:
        return "introspection_disabled"
    return "invalid_query"


def _camel_case_fields(error: BrokerError) -> dict[str, Any]:
    """REST's error body, with field names in ValidationFailed spelled as the GraphQL arguments are."""
    body = error.body()
    if isinstance(error, ValidationFailed):
        body["errors"] = [{**e, "field": _camel(e["field"])} for e in error.errors]
        first = body["errors"][0]
        body["detail"] = f"{first['field']}: {first['message']}"
    return body


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


class ErrorLog(logging.LoggerAdapter[logging.Logger]):
    """The logger ariadne reports every error to: client errors (bad queries, REST's 4xx) are answers, not
    faults, and are not logged, as REST does not log them; anything else is, with its traceback."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, GraphQLError) and is_client_error(error):
            return
        super().log(level, msg, *args, **kwargs)


def is_client_error(error: GraphQLError) -> bool:
    """A bad request (syntax, validation, variables, limits) or a BrokerError below 500."""
    original = unwrap_graphql_error(error)
    if isinstance(original, BrokerError):
        return original.status_code < 500
    return original is None or error.path is None
