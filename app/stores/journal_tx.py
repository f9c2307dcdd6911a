"""The state of one group-committed journal transaction, and the row <-> model conversions.

Every write of the journal is an operation applied to a `Tx`: it reads the current rows the batch loaded,
validates, then changes them through `transition` (which appends the one event of that change). Nothing here
touches the database; the writer turns a finished `Tx` into statements and commits them together.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.errors import QueueNotFound
from app.models import Event, EventType, Message, MessageStatus, Queue, QueueSettings

Row = dict[str, Any]
MESSAGE_COLUMNS = (
    "id", "queue_id", "content", "headers", "status", "delivery_count", "created_at", "updated_at",
    "available_at", "last_error", "dead_lettered_from", "lease_id", "lease_expires_at", "delivered_at",
)


@dataclass
class Counters:
    """Identifiers handed out by the one writer (it owns the journal, so no other process allocates them)."""

    message_id: int
    seq: int
    queue_id: int


@dataclass
class Tx:
    rows: dict[int, Row]
    counters: Counters
    queues_by_id: dict[int, Queue]
    # Committed counts of the queues the batch's operations asked for (Op.counts_for), read in the transaction.
    counts: dict[int, Counter[str]] = field(default_factory=dict)
    queues_changed: bool = False  # an operation created, changed or deleted a queue (in queues_by_id)
    # Idempotency keys the batch loaded: scope ("<queue_id>:<key>") -> (message_id, created_at, status or None)
    idempotency: dict[str, tuple[int, float, str | None]] = field(default_factory=dict)
    now: float = field(default_factory=time.time)
    inserted: list[Row] = field(default_factory=list)
    dirty: dict[int, Row] = field(default_factory=dict)
    deleted: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    statements: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    count_deltas: Counter[tuple[int, str]] = field(default_factory=Counter)

    def event(
        self,
        type_: EventType,
        queue: str | None,
        message_id: int | None,
        actor: str | None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        self.counters.seq += 1
        event = Event(self.counters.seq, self.now, type_, queue, message_id, actor, data or {})
        self.events.append(event)
        return event

    def insert_message(self, row: Row, actor: str | None, data: dict[str, Any] | None = None) -> Row:
        self.counters.message_id += 1
        row["id"] = self.counters.message_id
        self.inserted.append(row)
        self.rows[row["id"]] = row
        self.count_deltas[(row["queue_id"], row["status"])] += 1
        queue = self.queues_by_id[row["queue_id"]]
        self.event(EventType.MESSAGE_PUBLISHED, queue.name, row["id"], actor, data or {"status": row["status"]})
        return row

    def transition(
        self,
        row: Row,
        status: MessageStatus,
        event_type: EventType,
        actor: str | None,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        """Move one message to `status` (and maybe to another queue), apply column changes and journal exactly one
        event, named after the queue the message was in."""
        queue = self.queues_by_id.get(row["queue_id"])
        self.count_deltas[(row["queue_id"], row["status"])] -= 1
        row.update(changes, status=status.value, updated_at=self.now)
        self.count_deltas[(row["queue_id"], status.value)] += 1
        self.dirty[row["id"]] = row  # also a row inserted in this batch: its INSERT writes only a new row's columns
        name = queue.name if queue else None
        self.event(event_type, name, row["id"], actor, {"status": status.value, **(data or {})})

    def delete_message(self, row: Row, actor: str | None, data: dict[str, Any]) -> None:
        queue = self.queues_by_id.get(row["queue_id"])
        self.count_deltas[(row["queue_id"], row["status"])] -= 1
        self.deleted.append(row["id"])
        self.dirty.pop(row["id"], None)
        self.event(EventType.MESSAGE_DELETED, queue.name if queue else None, row["id"], actor, data)

    def live_count(self, queue_id: int, statuses: tuple[str, ...]) -> int:
        """Committed count plus this batch's changes so far."""
        committed = self.counts.get(queue_id, Counter())
        return sum(committed.get(s, 0) + self.count_deltas.get((queue_id, s), 0) for s in statuses)

    def queue_named(self, name: str | None) -> Queue | None:
        if name is None:
            return None
        return next((q for q in self.queues_by_id.values() if q.name == name), None)

    def require_queue(self, queue: Queue) -> None:
        """Refuse an operation on a queue deleted since the caller looked it up."""
        if queue.id not in self.queues_by_id:
            raise QueueNotFound(queue.name)

    def execute(self, sql: str, **params: Any) -> None:
        self.statements.append((sql, params))


def new_message_row(queue: Queue, content: str, headers: dict[str, str], status: MessageStatus, now: float,
                    available_at: float) -> Row:
    """A new message's row; the columns its INSERT leaves out are the database's defaults, as here."""
    return {
        "id": 0,
        "queue_id": queue.id,
        "content": content,
        "headers": orjson.dumps(headers).decode() if headers else None,
        "status": status.value,
        "delivery_count": 0,
        "created_at": now,
        "updated_at": now,
        "available_at": available_at,
        "last_error": None,
        "dead_lettered_from": None,
        "lease_id": None,
        "lease_expires_at": None,
        "delivered_at": None,
    }


def row_from_tuple(values: Iterable[Any]) -> Row:
    return dict(zip(MESSAGE_COLUMNS, values, strict=True))


def message_from_row(row: Row, queue_name: str) -> Message:
    return Message(
        id=row["id"],
        queue=queue_name,
        queue_id=row["queue_id"],
        content=row["content"],
        headers=orjson.loads(row["headers"]) if row["headers"] else {},
        status=MessageStatus(row["status"]),
        delivery_count=row["delivery_count"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        available_at=row["available_at"],
        last_error=row["last_error"],
        dead_lettered_from=row["dead_lettered_from"],
        lease_id=row["lease_id"],
        lease_expires_at=row["lease_expires_at"],
    )


def queue_from_row(values: tuple[Any, ...]) -> Queue:
    id_, name, created_at, updated_at, settings = values
    return Queue(id_, name, created_at, updated_at, QueueSettings(**orjson.loads(settings)))


def event_from_row(values: tuple[Any, ...]) -> Event:
    seq, ts, type_, queue, message_id, actor, data = values
    return Event(seq, ts, EventType(type_), queue, message_id, actor, orjson.loads(data))


def event_params(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "ts": event.ts,
        "type": event.type.value,
        "queue": event.queue,
        "message_id": event.message_id,
        "actor": event.actor,
        "data": orjson.dumps(event.data).decode(),
    }
