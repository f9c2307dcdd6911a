"""What every REST handler shares: the typed app state, JSON in and out, authentication and input checks."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict, cast
from urllib.parse import parse_qsl

import orjson
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.requests import Request
from starlette.responses import Response

from app.auth import TokenService
from app.broker import Broker
from app.errors import BadRequest, Forbidden, MessageNotFound, TooLarge, Unauthorized, ValidationFailed
from app.fanout import EventHub
from app.metrics import Metrics
from app.models import Principal, Role, is_valid_id
from app.settings import Settings


class AppState(TypedDict):
    """What the lifespan yields; handlers read it from `request.state`."""

    settings: Settings
    broker: Broker
    tokens: TokenService
    login_limiter: MovingWindowRateLimiter
    metrics: Metrics
    hub: EventHub
    started_at: float


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def state(request: Request) -> AppState:
    return cast(AppState, request.state._state)


class Call:
    """One request on the message hot path (api/hot.py), as its handler sees it: the app state, the path's one
    parameter (a queue name or a message id), headers, query string and the whole body, read already."""

    __slots__ = ("_query", "body", "headers", "param", "query_string", "state")

    def __init__(self, state: AppState, param: str, headers: list[tuple[bytes, bytes]], query_string: bytes,
                 body: bytes) -> None:
        self.state = state
        self.param = param
        self.headers = headers
        self.query_string = query_string
        self.body = body
        self._query: dict[str, str] | None = None

    def header(self, name: bytes) -> str | None:
        """The first value of a header (`name` in lower case), as Starlette's `request.headers.get`."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (the last value of a repeated one), as Starlette's `request.query_params`."""
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))
        return self._query

    def json_object(self, *, required: bool = True) -> dict[str, Any]:
        return parse_object(self.body, required=required)


Reply = tuple[int, Any]  # a hot-path handler's answer: status and the JSON value of the body


def parse_json(body: bytes, *, required: bool = True) -> Any:
    if not body.strip():
        if required:
            raise BadRequest("The request body must be JSON", code="invalid_json")
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc


def parse_object(body: bytes, *, required: bool = True) -> dict[str, Any]:
    data = parse_json(body, required=required)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
    return data


async def read_json(request: Request, *, required: bool = True) -> Any:
    return parse_json(await request.body(), required=required)


async def read_object(request: Request, *, required: bool = True) -> dict[str, Any]:
    return parse_object(await request.body(), required=required)


Endpoint = Callable[[Request, Principal], Awaitable[Response]]


def requires(*roles: Role) -> Callable[[Endpoint], Callable[[Request], Awaitable[Response]]]:
    """Authenticate the bearer token; with roles, the caller must hold one of them (admin holds all)."""

    def decorate(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            principal = authenticate(request)
            require_role(principal, roles)
            request.scope["principal"] = principal
            return await endpoint(request, principal)

        return wrapper

    return decorate


def authenticate(request: Request, kind: str = "access") -> Principal:
    return bearer(state(request)["tokens"], request.headers.get("authorization", ""), kind)


def bearer(tokens: TokenService, header: str, kind: str = "access") -> Principal:
    """The caller named by an `Authorization: Bearer <token>` header."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Not authenticated: send 'Authorization: Bearer <token>'")
    return tokens.verify(token.strip(), kind)


def require_role(principal: Principal, roles: tuple[Role, ...]) -> None:
    """With roles, the caller must hold one of them (admin holds all)."""
    if roles and not principal.has_any(*roles):
        needed = " or ".join(r.value for r in roles)
        raise Forbidden(f"This call needs the {needed} role")


# -- input checks: each raises ValidationFailed naming the field --------------------------------------------------


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"field": field, "message": message}])


def number(data: dict[str, Any], field: str, default: float | None, *, minimum: float = 0,
           maximum: float | None = None) -> float | None:
    value = data.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(field, "must be a number")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise _invalid(field, f"must be {bounds}")
    return float(value)


def integer(data: dict[str, Any], field: str, default: int | None, *, minimum: int = 0,
            maximum: int | None = None) -> int | None:
    value = data.get(field, default)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # query strings
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field, "must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise _invalid(field, f"must be {bounds}")
    return value


def query_number(params: Mapping[str, str], field: str, default: float, *, maximum: float) -> float:
    raw = params.get(field)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(field, "must be a number") from None
    result = number({field: value}, field, default, maximum=maximum)
    assert result is not None
    return result


def optional_number(params: Mapping[str, str], data: dict[str, Any], field: str, *, maximum: float,
                    minimum: float = 0) -> float | None:
    """A number from the body, else from the query string (seed clients send query parameters)."""
    if field in data:
        return number(data, field, None, minimum=minimum, maximum=maximum)
    raw = params.get(field)
    if raw is None or raw == "":
        return None
    try:
        return number({field: float(raw)}, field, None, minimum=minimum, maximum=maximum)
    except ValueError:
        raise _invalid(field, "must be a number") from None


def flag(params: Mapping[str, str], data: dict[str, Any], field: str, default: bool) -> bool:
    value: Any = data.get(field, params.get(field, default))
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise _invalid(field, "must be true or false")


def text(data: dict[str, Any], field: str, *, required: bool = False, max_length: int = 1024) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required")
        return None
    if not isinstance(value, str) or (required and not value):
        raise _invalid(field, "must be a non-empty string" if required else "must be a string")
    if len(value) > max_length:
        raise _invalid(field, f"must be at most {max_length} characters")
    return value


def message_id_param(raw: str) -> int:
    try:
        message_id = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"'{raw}' is not a valid message id", code="invalid_id") from None
    if not is_valid_id(message_id):
        raise MessageNotFound(message_id)  # no such id can exist
    return message_id


def check_size(payload: bytes, limit: int, what: str) -> None:
    if len(payload) > limit:
        raise TooLarge(f"The {what} is {len(payload)} bytes; the limit is {limit} bytes")
