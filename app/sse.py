"""SSE endpoints: GET /events and GET /queues/{q}/events (sse-starlette), on the process's event fan-out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from app.api import render
from app.api.common import requires, state
from app.api.queues import queue_name
from app.errors import ValidationFailed
from app.fanout import EventFilter, EventHub, SubscriberOverflow
from app.models import MAX_ID, EventType, Principal

PING_SECONDS = 15
SEND_TIMEOUT_SECONDS = 30  # a client that does not take a frame for this long is cut off
EVENT_TYPES = frozenset(t.value for t in EventType)


@requires()
async def events(request: Request, principal: Principal) -> Response:
    raw = request.query_params.get("queue", "")
    queues = frozenset(queue_name(q) for q in raw.split(",") if q)
    return await _stream(request, principal, queues)


@requires()
async def queue_events(request: Request, principal: Principal) -> Response:
    name = queue_name(request.path_params["queue"])
    await state(request)["broker"].queue(name)  # 404 for an unknown queue
    return await _stream(request, principal, frozenset({name}))


def parse_types(raw: str) -> frozenset[str]:
    types = frozenset(t.strip() for t in raw.split(",") if t.strip())
    unknown = sorted(types - EVENT_TYPES)
    if unknown:
        raise ValidationFailed([{"field": "types", "message": f"unknown event types: {', '.join(unknown)}"}])
    return types


def parse_since(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("since")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:
        raise ValidationFailed([{"field": "since", "message": "must be an event id (a non-negative integer)"}])
    return int(raw)


async def _stream(request: Request, principal: Principal, queues: frozenset[str]) -> Response:
    app = state(request)
    accepts = EventFilter(queues, parse_types(request.query_params.get("types", "")))
    since = parse_since(request)
    hub = app["hub"]
    hub.require_stream_slot(principal.username)
    return EventSourceResponse(_frames(hub, principal.username, accepts, since), ping=PING_SECONDS,
                               send_timeout=SEND_TIMEOUT_SECONDS)


async def _frames(
    hub: EventHub, username: str, accepts: EventFilter, since: int | None
) -> AsyncIterator[ServerSentEvent]:
    with hub.stream_of(username):
        try:
            async for event in hub.subscribe(accepts, since):
                yield ServerSentEvent(data=orjson.dumps(render.event(event)).decode(), event=event.type.value,
                                      id=str(event.seq))
        except SubscriberOverflow:
            # Too far behind: end the stream; the client reconnects with Last-Event-ID and replays the rest.
            yield ServerSentEvent(comment="fell behind; reconnect with Last-Event-ID to resume")
