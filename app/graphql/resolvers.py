"""GraphQL resolvers: each checks the caller's role, validates with REST's helpers, and calls one broker method.

Arguments arrive in snake_case (the schema converts names), so a resolver's keyword arguments are the body REST
would have received, and REST's checks apply to them unchanged; no rule is written twice.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import orjson
from ariadne import EnumType, MutationType, ObjectType, QueryType, ScalarType, SubscriptionType
from graphql import GraphQLResolveInfo, ValueNode, value_from_ast_untyped

from app import __version__
from app.api import render
from app.api.common import integer, number, text
from app.api.messages import MAX_BROWSE, MAX_DELAY_SECONDS, MAX_IDEMPOTENCY_KEY, parse_message
from app.api.queues import MAX_REDRIVE, MAX_VISIBILITY_TIMEOUT, MIN_VISIBILITY_TIMEOUT, queue_name, settings_changes
from app.broker import MAX_CONSUME, MAX_WAIT_SECONDS
from app.errors import Conflict, MessageNotFound, ValidationFailed
from app.fanout import EventFilter, EventHub, SubscriberOverflow
from app.graphql.context import GraphQLContext
from app.models import Delivery, Event, Message, MessageStatus, QueueSettings, Role, is_valid_id, iso
from app.sse import parse_types

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
INTEGER = re.compile(r"-?[0-9]{1,20}")
Info: TypeAlias = "GraphQLResolveInfo[GraphQLContext]"

query = QueryType()
mutation = MutationType()
subscription = SubscriptionType()
message_type = ObjectType("Message")
delivery_type = ObjectType("Delivery")
event_type = ObjectType("Event")


def valid_message_id(value: int) -> int:
    if not is_valid_id(value):
        raise MessageNotFound(value)  # no such id can exist
    return value


def lease(args: dict[str, Any]) -> str | None:
    return text(args, "lease_id") or None  # as REST: an empty lease id is none (the current delivery)


# -- scalars and enums ----------------------------------------------------------------------------------------------


def _long(value: Any) -> int:
    if isinstance(value, str) and INTEGER.fullmatch(value):  # clients that keep 64-bit ids as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not LONG_MIN <= value <= LONG_MAX:
        raise ValueError(f"Long cannot represent {value!r}: not a 64-bit integer")
    return value


def _long_literal(node: ValueNode, variables: dict[str, Any] | None = None) -> int:
    return _long(value_from_ast_untyped(node, variables))


def _datetime(value: Any) -> str | None:
    return iso(value) if isinstance(value, int | float) else cast(str | None, value)


def _json(value: Any) -> Any:
    return value


def _json_literal(node: ValueNode, variables: dict[str, Any] | None = None) -> Any:
    return value_from_ast_untyped(node, variables)


json_scalar = ScalarType("JSON", serializer=_json, value_parser=_json, literal_parser=_json_literal)
long_scalar = ScalarType("Long", serializer=_long, value_parser=_long, literal_parser=_long_literal)
datetime_scalar = ScalarType("DateTime", serializer=_datetime)
status_enum = EnumType("MessageStatus", {s.value: s for s in MessageStatus})


# -- queries ----------------------------------------------------------------------------------------------------------


@query.field("queues")
async def resolve_queues(_: None, info: Info) -> list[dict[str, Any]]:
    now = time.time()
    return [render.queue(s, now) for s in await info.context.broker.list_queue_stats()]


@query.field("queue")
async def resolve_queue(_: None, info: Info, name: str) -> dict[str, Any]:
    return render.queue(await info.context.broker.queue_stats(queue_name(name)), time.time())


@query.field("message")
async def resolve_message(_: None, info: Info, id: int) -> Message:
    found = await info.context.broker.message(valid_message_id(id))
    if found is None:
        raise MessageNotFound(id)
    return found


@query.field("messages")
async def resolve_messages(_: None, info: Info, queue: str, **args: Any) -> dict[str, Any]:
    limit = integer(args, "limit", 50, minimum=1, maximum=MAX_BROWSE) or 50
    after_id = integer(args, "after_id", 0, minimum=0) or 0
    found = await info.context.broker.browse(queue_name(queue), args.get("status"), after_id, limit)
    return {"messages": found, "next_after_id": found[-1].id if len(found) == limit else None}


@query.field("messageHistory")
async def resolve_message_history(_: None, info: Info, id: int) -> list[Event]:
    events = await info.context.broker.history(valid_message_id(id))
    if not events:
        raise MessageNotFound(id)
    return events


@query.field("stats")
async def resolve_stats(_: None, info: Info) -> dict[str, Any]:
    state = info.context.state
    broker, tally = state["broker"], state["metrics"].tally
    queues = await broker.list_queue_stats()
    totals = {s.value: sum(q.counts.get(s.value, 0) for q in queues) for s in MessageStatus}
    return {
        "version": __version__, "start_time": state["started_at"], "uptime_seconds": time.time() - state["started_at"],
        "requests_total": tally.requests_total, "queues_total": len(queues), "messages_total": sum(totals.values()),
        **{f"messages_{status}": count for status, count in totals.items()},
        "last_error": tally.last_error or broker.journal.stats.last_error, "last_error_timestamp": tally.last_error_at,
        "redis_up": broker.recovery.redis_up, "journal_healthy": broker.journal.healthy,
    }


# -- queue administration -----------------------------------------------------------------------------------------


@mutation.field("createQueue")
async def resolve_create_queue(_: None, info: Info, name: str, **settings: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.ADMIN).username
    stats = await context.broker.create_queue(queue_name(name), QueueSettings(**settings_changes(settings)), actor)
    return render.queue(stats, time.time())


@mutation.field("updateQueue")
async def resolve_update_queue(_: None, info: Info, name: str, **settings: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.ADMIN).username
    stats = await context.broker.update_queue(queue_name(name), settings_changes(settings), actor)
    return render.queue(stats, time.time())


@mutation.field("deleteQueue")
async def resolve_delete_queue(_: None, info: Info, name: str) -> bool:
    context = info.context
    await context.broker.delete_queue(queue_name(name), context.require(Role.ADMIN).username)
    return True


@mutation.field("purgeQueue")
async def resolve_purge_queue(_: None, info: Info, name: str) -> dict[str, Any]:
    context = info.context
    return {"purged": await context.broker.purge_queue(queue_name(name), context.require(Role.ADMIN).username)}


@mutation.field("redriveQueue")
async def resolve_redrive_queue(_: None, info: Info, name: str, **args: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.ADMIN).username
    limit = integer(args, "limit", MAX_REDRIVE, minimum=1, maximum=MAX_REDRIVE) or MAX_REDRIVE
    return {"moved": await context.broker.redrive(queue_name(name), limit, actor)}


# -- messages ---------------------------------------------------------------------------------------------------------


@mutation.field("publish")
async def resolve_publish(_: None, info: Info, queue: str, **fields: Any) -> Any:
    context = info.context
    actor = context.require(Role.PRODUCER).username
    target = await context.broker.queue(queue_name(queue))
    key = fields.pop("idempotency_key", None)
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationFailed([{"field": "idempotency_key", "message": f"must be 1-{MAX_IDEMPOTENCY_KEY} characters"}])
    item = parse_message(fields, context.settings.max_message_bytes, target, key=key)
    [result] = await context.broker.publish(target.name, [item], actor)
    return result


@mutation.field("consume")
async def resolve_consume(_: None, info: Info, queue: str, **args: Any) -> list[DeliveryView]:
    context = info.context
    actor = context.require(Role.CONSUMER).username
    count = integer(args, "max", 1, minimum=1, maximum=MAX_CONSUME) or 1
    wait = number(args, "wait", 0.0, maximum=MAX_WAIT_SECONDS) or 0.0
    timeout = number(args, "visibility_timeout", None, minimum=MIN_VISIBILITY_TIMEOUT, maximum=MAX_VISIBILITY_TIMEOUT)
    deliveries = await context.broker.consume(queue_name(queue), max_messages=count, wait=wait,
                                              visibility_timeout=timeout, actor=actor)
    return [DeliveryView(d) for d in deliveries]


@mutation.field("ack")
async def resolve_ack(_: None, info: Info, message_id: int, **args: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.CONSUMER).username
    acked = await context.broker.ack(valid_message_id(message_id), lease(args), actor)
    return {"status": acked.status, "message": acked}


@mutation.field("nack")
async def resolve_nack(_: None, info: Info, message_id: int, **args: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.CONSUMER).username
    change = await context.broker.nack(
        valid_message_id(message_id), lease(args), requeue=bool(args.get("requeue")),
        delay=number(args, "delay_seconds", 0.0, maximum=MAX_DELAY_SECONDS) or 0.0,
        reason=text(args, "reason", max_length=4096), actor=actor,
    )
    moved = change.message.queue != change.from_queue
    return {"status": change.message.status, "dead_letter_queue": change.message.queue if moved else None,
            "message": change.message}


@mutation.field("extendLease")
async def resolve_extend_lease(_: None, info: Info, message_id: int, **args: Any) -> dict[str, Any]:
    context = info.context
    actor = context.require(Role.CONSUMER).username
    seconds = number(args, "visibility_timeout", None, minimum=MIN_VISIBILITY_TIMEOUT, maximum=MAX_DELAY_SECONDS)
    assert seconds is not None  # a non-null argument
    extended = await context.broker.extend(valid_message_id(message_id), lease(args), seconds, actor)
    return {"message_id": extended.id, "lease_id": extended.lease_id, "lease_expires_at": extended.lease_expires_at,
            "message": extended}


@dataclass(frozen=True)
class DeliveryView:
    """A delivery as REST and the schema show it: the message's fields, plus the lease's."""

    delivery: Delivery

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.delivery.message, name)

    @property
    def message_id(self) -> int:
        return self.delivery.message.id

    @property
    def lease_id(self) -> str:
        return self.delivery.lease_id

    @property
    def lease_expires_at(self) -> float:
        return self.delivery.lease_expires_at

    @property
    def retrieved_at(self) -> float:
        return self.delivery.retrieved_at


@message_type.field("content")
@delivery_type.field("content")
def resolve_content(message: Message | DeliveryView, info: Info) -> Any:
    return orjson.loads(message.content)  # the JSON text exactly as published


@message_type.field("history")
@delivery_type.field("history")
async def resolve_history(message: Message | DeliveryView, info: Info) -> list[Event]:
    return await info.context.broker.history(message.id)


@event_type.field("type")
def resolve_event_type(event: Event, info: Info) -> str:
    return event.type.value


@event_type.field("message")
async def resolve_event_message(event: Event, info: Info) -> Message | None:
    return await info.context.broker.message(event.message_id) if event.message_id is not None else None


# -- events -----------------------------------------------------------------------------------------------------------


async def events_source(_: None, info: Info, **args: Any) -> AsyncIterator[Event]:
    """Checked here, before the first event, so a bad subscription is refused with an `error` message; the same
    events, filter, replay and per-user stream cap as SSE."""
    context = info.context
    username = context.require().username
    queues: frozenset[str] = frozenset()
    if args.get("queue") is not None:
        name = queue_name(args["queue"])
        await context.broker.queue(name)  # queue_not_found, as GET /queues/{q}/events
        queues = frozenset({name})
    accepts = EventFilter(queues, parse_types(",".join(args.get("types") or ())))
    since = args.get("since")
    if since is not None and since < 0:
        raise ValidationFailed([{"field": "since", "message": "must be an event seq (a non-negative integer)"}])
    context.hub.require_stream_slot(username)
    # Without `since`, start from the journal's end now rather than when the first event is awaited: an event
    # committed after this subscribe message was handled is delivered.
    start = since if since is not None else await context.broker.journal.last_seq()
    return _events(context.hub, username, accepts, start)


# A coroutine returning the iterator (graphql-core awaits it), so that its checks run at subscribe time.
subscription.set_source("events", events_source)  # type: ignore[arg-type]


async def _events(hub: EventHub, username: str, accepts: EventFilter, since: int) -> AsyncIterator[Event]:
    with hub.stream_of(username):
        # Closed with this generator, so the hub forgets the subscriber as soon as the client completes it.
        subscribed = cast(AsyncGenerator[Event, None], hub.subscribe(accepts, since))
        async with contextlib.aclosing(subscribed) as events:
            try:
                async for event in events:
                    yield event
            except SubscriberOverflow:
                raise Conflict(f"This subscription fell more than {hub.buffer} events behind; subscribe again "
                               "with since=<the last seq received> to resume", code="fell_behind") from None


@subscription.field("events")
def resolve_event(event: Event, info: Info, **args: Any) -> Event:
    return event


BINDABLES = [query, mutation, subscription, message_type, delivery_type, event_type, json_scalar, long_scalar,
             datetime_scalar, status_enum]
