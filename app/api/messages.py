"""REST handlers for messages: publish, consume, ack, nack and extend (the hot path, served by api/hot.py), and
reading a message, its history, or a queue's messages (Starlette routes)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.api import render
from app.api.common import (
    Call,
    JSONResponse,
    Reply,
    check_size,
    flag,
    integer,
    message_id_param,
    number,
    optional_number,
    query_number,
    requires,
    state,
    text,
)
from app.api.queues import MAX_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT, queue_name
from app.broker import MAX_CONSUME, MAX_WAIT_SECONDS
from app.errors import MessageNotFound, ValidationFailed
from app.models import MAX_ID, MessageStatus, NewMessage, Principal, Queue, iso

MAX_BATCH = 1000
MAX_BROWSE = 500
MAX_IDEMPOTENCY_KEY = 255
MAX_DELAY_SECONDS = 30 * 24 * 3600.0


def max_delay(queue: Queue) -> float:
    """A delay may be as long as the queue keeps messages (its retention), else up to MAX_DELAY_SECONDS."""
    return queue.settings.retention_seconds or MAX_DELAY_SECONDS


def parse_message(data: Any, max_bytes: int, queue: Queue, where: str = "", key: str | None = None) -> NewMessage:
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": where or "body", "message": "must be a JSON object"}])
    if "content" not in data:
        raise ValidationFailed([{"field": f"{where}content", "message": "is required"}])
    content = orjson.dumps(data["content"])
    check_size(content, max_bytes, "message content")
    headers = data.get("headers") or {}
    if headers and (not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())):
        raise ValidationFailed([{"field": f"{where}headers", "message": "must be an object of strings"}])
    delay = 0.0
    if "delay_seconds" in data:  # most messages have none: a batch of a thousand skips a thousand checks
        try:
            delay = number(data, "delay_seconds", 0.0, maximum=max_delay(queue)) or 0.0
        except ValidationFailed as exc:
            raise ValidationFailed([{**e, "field": where + e["field"]} for e in exc.errors]) from None
    return NewMessage(content=content.decode(), headers=headers, delay_seconds=delay, idempotency_key=key)


# -- the hot path (api/hot.py routes these; each takes a Call and answers with a Reply) ----------------------------


async def publish(call: Call, principal: Principal) -> Reply:
    broker = call.state["broker"]
    queue = await broker.queue(queue_name(call.param))
    key = call.header(b"idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationFailed([{"field": "Idempotency-Key", "message": f"must be 1-{MAX_IDEMPOTENCY_KEY} characters"}])
    item = parse_message(call.json_object(), call.state["settings"].max_message_bytes, queue, key=key)
    [result] = await broker.publish(queue.name, [item], principal.username)
    status = result.status.value if result.status is not None else "deleted"
    if result.duplicate:
        return 200, {"message": "Duplicate of an earlier publish; nothing new was published",
                     "message_id": result.message_id, "status": status, "duplicate": True}
    return 201, {"message": "Message published successfully", "message_id": result.message_id, "status": status}


async def publish_batch(call: Call, principal: Principal) -> Reply:
    broker = call.state["broker"]
    queue = await broker.queue(queue_name(call.param))
    messages = call.json_object().get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_BATCH:
        raise ValidationFailed([{"field": "messages", "message": f"must be a list of 1 to {MAX_BATCH} messages"}])
    limit = call.state["settings"].max_message_bytes
    items = [parse_message(m, limit, queue, f"messages[{i}].") for i, m in enumerate(messages)]
    results = await broker.publish(queue.name, items, principal.username)
    return 201, {"message_ids": [r.message_id for r in results]}


async def consume_one(call: Call, principal: Principal) -> Reply:
    """GET: the seed's call: one delivery, or null when nothing is ready within `wait`."""
    name = queue_name(call.param)
    query = call.query if call.query_string else {}
    wait = query_number(query, "wait", 0.0, maximum=MAX_WAIT_SECONDS)
    timeout = optional_number(query, {}, "visibility_timeout", minimum=MIN_VISIBILITY_TIMEOUT,
                              maximum=MAX_VISIBILITY_TIMEOUT)
    deliveries = await call.state["broker"].consume(
        name, max_messages=1, wait=wait, visibility_timeout=timeout, actor=principal.username
    )
    return 200, render.delivery(deliveries[0]) if deliveries else None


async def consume_many(call: Call, principal: Principal) -> Reply:
    name = queue_name(call.param)
    data = call.json_object(required=False)
    count = integer(data, "max", 1, minimum=1, maximum=MAX_CONSUME)
    wait = number(data, "wait", 0.0, maximum=MAX_WAIT_SECONDS)
    timeout = optional_number(call.query, data, "visibility_timeout", minimum=MIN_VISIBILITY_TIMEOUT,
                              maximum=MAX_VISIBILITY_TIMEOUT)
    deliveries = await call.state["broker"].consume(
        name, max_messages=count or 1, wait=wait or 0.0, visibility_timeout=timeout,
        actor=principal.username,
    )
    return 200, {"messages": [render.delivery(d) for d in deliveries]}


async def ack(call: Call, principal: Principal) -> Reply:
    message_id = message_id_param(call.param)
    data = call.json_object(required=False)
    lease_id = text(data, "lease_id") or call.query.get("lease_id")
    message = await call.state["broker"].ack(message_id, lease_id, principal.username)
    return 200, {"detail": f"Message {message_id} acknowledged successfully.", "status": message.status.value}


async def nack(call: Call, principal: Principal) -> Reply:
    message_id = message_id_param(call.param)
    data = call.json_object(required=False)
    lease_id = text(data, "lease_id") or call.query.get("lease_id")
    requeue = flag(call.query, data, "requeue", False)
    reason = text(data, "reason", max_length=4096)
    delay = optional_number(call.query, data, "delay_seconds", maximum=MAX_DELAY_SECONDS) or 0.0
    change = await call.state["broker"].nack(
        message_id, lease_id, requeue=requeue, delay=delay, reason=reason, actor=principal.username
    )
    message = change.message
    body: dict[str, Any] = {"status": message.status.value}
    if message.queue != change.from_queue:
        outcome = f"moved to dead-letter queue '{message.queue}'"
        body["dead_letter_queue"] = message.queue
    else:
        outcome = {
            MessageStatus.PENDING: "requeued",
            MessageStatus.DELAYED: f"requeued after {delay:g}s",
        }.get(message.status, "marked failed")
    return 200, {"detail": f"Message {message_id} {outcome}.", **body}


async def extend(call: Call, principal: Principal) -> Reply:
    message_id = message_id_param(call.param)
    data = call.json_object()
    lease_id = text(data, "lease_id") or call.query.get("lease_id")
    if data.get("visibility_timeout") is None:
        raise ValidationFailed([{"field": "visibility_timeout", "message": "is required"}])
    seconds = number(data, "visibility_timeout", None, minimum=MIN_VISIBILITY_TIMEOUT, maximum=MAX_DELAY_SECONDS)
    assert seconds is not None
    message = await call.state["broker"].extend(message_id, lease_id, seconds, principal.username)
    return 200, {"lease_expires_at": iso(message.lease_expires_at), "lease_id": message.lease_id}


# -- reads (Starlette routes) ------------------------------------------------------------------------------------


@requires()
async def get_message(request: Request, principal: Principal) -> Response:
    message_id = message_id_param(request.path_params["message_id"])
    message = await state(request)["broker"].message(message_id)
    if message is None:
        raise MessageNotFound(message_id)
    return JSONResponse(render.message(message))


@requires()
async def history(request: Request, principal: Principal) -> Response:
    message_id = message_id_param(request.path_params["message_id"])
    events = await state(request)["broker"].history(message_id)
    if not events:
        raise MessageNotFound(message_id)
    return JSONResponse({"events": [render.event(e) for e in events]})


@requires()
async def browse(request: Request, principal: Principal) -> Response:
    name = queue_name(request.path_params["queue"])
    params = dict(request.query_params)
    raw_status = params.get("status")
    try:
        status = MessageStatus(raw_status) if raw_status else None
    except ValueError:
        choices = ", ".join(s.value for s in MessageStatus)
        raise ValidationFailed([{"field": "status", "message": f"must be one of {choices}"}]) from None
    limit = integer(params, "limit", 50, minimum=1, maximum=MAX_BROWSE) or 50
    after_id = integer(params, "after_id", 0, minimum=0, maximum=MAX_ID) or 0
    messages = await state(request)["broker"].browse(name, status, after_id, limit)
    next_after = messages[-1].id if len(messages) == limit else None
    return JSONResponse({"messages": [render.message(m) for m in messages], "next_after_id": next_after})
