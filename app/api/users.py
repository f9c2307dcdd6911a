"""REST handlers for user management (admin only)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.api import render
from app.api.common import JSONResponse, read_object, requires, state, text
from app.errors import ValidationFailed
from app.models import Principal, Role
from app.users import add_user, parse_roles, remove_user


@requires(Role.ADMIN)
async def list_users(request: Request, principal: Principal) -> Response:
    return JSONResponse([render.user(u) for u in await state(request)["broker"].journal.users()])


@requires(Role.ADMIN)
async def create_user(request: Request, principal: Principal) -> Response:
    data = await read_object(request)
    username = text(data, "username", required=True, max_length=128)
    password = text(data, "password", required=True, max_length=1024)
    raw_roles = data.get("roles", [])
    if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
        raise ValidationFailed([{"field": "roles", "message": "must be a list of role names"}])
    assert username is not None and password is not None
    user = await add_user(state(request)["broker"].journal, username, password, parse_roles(raw_roles))
    return JSONResponse(render.user(user), status_code=201)


@requires(Role.ADMIN)
async def delete_user(request: Request, principal: Principal) -> Response:
    await remove_user(state(request)["broker"].journal, request.path_params["username"])
    return Response(status_code=204)
