"""REST handlers for queues: list, create, read, change, delete, purge."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.api import render
from app.api.common import JSONResponse, integer, number, read_object, requires, state, text
from app.errors import InvalidQueueName, ValidationFailed
from app.models import QUEUE_NAME_RE, Principal, QueueSettings, Role

SETTINGS_FIELDS = ("visibility_timeout", "max_deliveries", "dead_letter_queue", "max_length", "retention_seconds")
MIN_VISIBILITY_TIMEOUT = 0.001
MAX_VISIBILITY_TIMEOUT = 12 * 3600.0
MAX_REDRIVE = 10_000
MAX_RETENTION = 10 * 365 * 24 * 3600.0  # ten years; a delay may be as long as this


def queue_name(raw: object) -> str:
    if not isinstance(raw, str) or not QUEUE_NAME_RE.fullmatch(raw):
        raise InvalidQueueName(
            "Queue names are 1-255 characters from A-Z a-z 0-9 _ - . and do not start with '.'"
        )
    return raw


def settings_changes(data: dict[str, Any]) -> dict[str, Any]:
    """The queue settings present in a request body, checked."""
    changes: dict[str, Any] = {}
    nulls = [f for f in ("visibility_timeout", "max_deliveries") if f in data and data[f] is None]
    if nulls:
        raise ValidationFailed([{"field": f, "message": "cannot be null"} for f in nulls])
    if "visibility_timeout" in data:
        changes["visibility_timeout"] = number(data, "visibility_timeout", None, minimum=MIN_VISIBILITY_TIMEOUT,
                                               maximum=MAX_VISIBILITY_TIMEOUT)
    if "max_deliveries" in data:
        changes["max_deliveries"] = integer(data, "max_deliveries", None, minimum=1)
    if "dead_letter_queue" in data:
        dlq = text(data, "dead_letter_queue", max_length=255)
        changes["dead_letter_queue"] = queue_name(dlq) if dlq is not None else None
    if "max_length" in data:
        changes["max_length"] = integer(data, "max_length", None, minimum=1)
    if "retention_seconds" in data:
        changes["retention_seconds"] = number(data, "retention_seconds", None, minimum=1, maximum=MAX_RETENTION)
    unknown = sorted(set(data) - set(SETTINGS_FIELDS) - {"name"})
    if unknown:
        raise ValidationFailed([{"field": f, "message": "is not a queue setting"} for f in unknown])
    return changes


@requires()
async def list_queues(request: Request, principal: Principal) -> Response:
    now = time.time()
    return JSONResponse([render.queue(s, now) for s in await state(request)["broker"].list_queue_stats()])


@requires(Role.ADMIN)
async def create_queue(request: Request, principal: Principal) -> Response:
    data = await read_object(request)
    if "name" not in data:
        raise ValidationFailed([{"field": "name", "message": "is required"}])
    name = queue_name(data["name"])
    settings = QueueSettings(**settings_changes(data))
    stats = await state(request)["broker"].create_queue(name, settings, principal.username)
    return JSONResponse(render.queue(stats, time.time()), status_code=201)


@requires()
async def get_queue(request: Request, principal: Principal) -> Response:
    stats = await state(request)["broker"].queue_stats(queue_name(request.path_params["queue"]))
    return JSONResponse(render.queue(stats, time.time()))


@requires(Role.ADMIN)
async def update_queue(request: Request, principal: Principal) -> Response:
    name = queue_name(request.path_params["queue"])
    data = await read_object(request)
    if "name" in data and data["name"] != name:
        raise ValidationFailed([{"field": "name", "message": "a queue cannot be renamed"}])
    stats = await state(request)["broker"].update_queue(name, settings_changes(data), principal.username)
    return JSONResponse(render.queue(stats, time.time()))


@requires(Role.ADMIN)
async def delete_queue(request: Request, principal: Principal) -> Response:
    await state(request)["broker"].delete_queue(queue_name(request.path_params["queue"]), principal.username)
    return Response(status_code=204)


@requires(Role.ADMIN)
async def redrive_queue(request: Request, principal: Principal) -> Response:
    name = queue_name(request.path_params["queue"])
    data = await read_object(request, required=False)
    limit = integer(data, "limit", MAX_REDRIVE, minimum=1, maximum=MAX_REDRIVE) or MAX_REDRIVE
    moved = await state(request)["broker"].redrive(name, limit, principal.username)
    return JSONResponse({"moved": moved})


@requires(Role.ADMIN)
async def purge_queue(request: Request, principal: Principal) -> Response:
    purged = await state(request)["broker"].purge_queue(queue_name(request.path_params["queue"]),
                                                        principal.username)
    return JSONResponse({"purged": purged})
