"""REST handlers for tokens: /login (form or JSON) and /refresh."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qsl

from limits import parse as parse_rate
from starlette.requests import Request
from starlette.responses import Response

from app.api.common import JSONResponse, authenticate, read_object, state
from app.auth import verify_password
from app.errors import RateLimited, Unauthorized, ValidationFailed


async def login(request: Request) -> Response:
    app = state(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        data = await read_object(request)
    else:
        data = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
    username, password = data.get("username"), data.get("password")
    missing = [f for f, v in (("username", username), ("password", password)) if not isinstance(v, str) or not v]
    if missing:
        raise ValidationFailed([{"field": f, "message": "is required"} for f in missing])
    assert isinstance(username, str) and isinstance(password, str)

    limiter, rate = app["login_limiter"], parse_rate(app["settings"].login_rate_limit)
    client = request.client.host if request.client else "unknown"
    if not await limiter.test(rate, client, username):
        stats = await limiter.get_window_stats(rate, client, username)
        raise RateLimited("Too many failed logins; wait before trying again",
                          int(stats.reset_time - time.time()) + 1)
    found = await app["broker"].journal.user_with_hash(username)
    valid = await asyncio.to_thread(verify_password, found[1] if found else None, password)  # argon2 is slow
    if not valid or found is None:
        await limiter.hit(rate, client, username)
        raise Unauthorized("Incorrect username or password", code="invalid_credentials")
    return JSONResponse(app["tokens"].issue(found[0].username, found[0].roles))


async def refresh(request: Request) -> Response:
    """Trade a refresh token for a new pair; the user must still exist, and gets their current roles."""
    app = state(request)
    principal = authenticate(request, "refresh")
    found = await app["broker"].journal.user_with_hash(principal.username)
    if found is None:
        raise Unauthorized("The user of this token no longer exists", code="invalid_token")
    return JSONResponse(app["tokens"].issue(found[0].username, found[0].roles))
