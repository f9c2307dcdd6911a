"""The journal's write operations: each validates against the rows of its transaction, then changes them.

An operation raises a BrokerError before it changes anything, so a refused operation never leaves a half-applied
change in the batch it shares with others. Each accepted change journals exactly one event (DESIGN.md, invariant 5).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import (
    MessageNotFound,
    NotProcessing,
    QueueExists,
    StaleLease,
    UserExists,
    UserNotFound,
)
from app.models import EventType, MessageStatus, NewMessage, Queue, QueueSettings, iso
from app.stores.journal_tx import Row, Tx, new_message_row
from app.stores.sql_blocks import load

SQL = load("journal.sql")
SYSTEM = "system"
# A lease the reaper saw expire in Redis may look a few ms alive to the journal (rounding, clock reads).
LEASE_SLACK_SECONDS = 0.5


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: list[Row]
    # Ids Redis handed out that the journal refused (a stale copy): each with the deadline of the lease that
    # legitimately holds it, if any, so the caller can restore that lease in Redis.
    refused: list[tuple[int, float | None]]


# -- queues ------------------------------------------------------------------------------------------------------


def create_queue(tx: Tx, name: str, settings: QueueSettings, actor: str) -> Queue:
    if any(q.name == name for q in tx.queues_by_id.values()):
        raise QueueExists(name)
    tx.counters.queue_id += 1
    queue = Queue(tx.counters.queue_id, name, tx.now, tx.now, settings)
    tx.queues_by_id[queue.id] = queue
    tx.execute(SQL["insert_queue"], id=queue.id, name=name, created_at=tx.now, updated_at=tx.now,
               settings=_settings_json(settings))
    tx.event(EventType.QUEUE_CREATED, name, None, actor, {"settings": settings.as_dict()})
    return queue


def update_queue(tx: Tx, queue: Queue, settings: QueueSettings, actor: str) -> Queue:
    tx.require_queue(queue)
    updated = Queue(queue.id, queue.name, queue.created_at, tx.now, settings)
    tx.queues_by_id[queue.id] = updated
    tx.execute(SQL["update_queue"], id=queue.id, settings=_settings_json(settings), updated_at=tx.now)
    tx.event(EventType.QUEUE_UPDATED, queue.name, None, actor, {"settings": settings.as_dict()})
    return updated


def delete_queue(tx: Tx, queue: Queue, counts: dict[str, int], actor: str) -> int:
    """Delete a queue and all its messages: one event with how many went. Runs alone in its transaction."""
    tx.require_queue(queue)
    del tx.queues_by_id[queue.id]
    tx.execute(SQL["delete_queue_messages"], queue_id=queue.id)
    tx.execute(SQL["delete_queue"], id=queue.id)
    for status, n in counts.items():
        tx.count_deltas[(queue.id, status)] -= n
    deleted = sum(counts.values())
    tx.event(EventType.QUEUE_DELETED, queue.name, None, actor, {"messages_deleted": deleted})
    return deleted


def purge_queue(tx: Tx, queue: Queue, counts: dict[str, int], actor: str) -> int:
    """Delete a queue's pending and delayed messages (not those being processed). Runs alone in its transaction."""
    tx.require_queue(queue)
    tx.execute(SQL["purge_queue_messages"], queue_id=queue.id)
    purged = 0
    for status in (MessageStatus.PENDING.value, MessageStatus.DELAYED.value):
        n = counts.get(status, 0)
        tx.count_deltas[(queue.id, status)] -= n
        purged += n
    tx.event(EventType.QUEUE_PURGED, queue.name, None, actor, {"purged": purged})
    return purged


# -- messages ----------------------------------------------------------------------------------------------------


def publish(tx: Tx, queue: Queue, items: list[NewMessage], actor: str) -> list[Row]:
    tx.require_queue(queue)
    rows = []
    for item in items:
        if item.delay_seconds > 0:
            status, available_at = MessageStatus.DELAYED, tx.now + item.delay_seconds
        else:
            status, available_at = MessageStatus.PENDING, tx.now
        row = new_message_row(queue, item.content, item.headers, status, tx.now, available_at)
        rows.append(tx.insert_message(row, actor))
    return rows


def record_deliveries(
    tx: Tx, queue: Queue, ids: list[int], lease_expires_at: float, actor: str
) -> DeliveryOutcome:
    """Journal the hand-off of ids that Redis moved to processing. The journal arbitrates: only a pending
    message (or one whose lease ran out before the reaper saw it) is delivered; any other id is a stale copy."""
    tx.require_queue(queue)
    delivered: list[Row] = []
    refused: list[tuple[int, float | None]] = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["queue_id"] != queue.id:
            refused.append((message_id, None))
            continue
        status = row["status"]
        if status == MessageStatus.PROCESSING.value and row["lease_expires_at"] > tx.now:
            refused.append((message_id, row["lease_expires_at"]))
            continue
        if status == MessageStatus.PROCESSING.value:
            _expire(tx, row, queue, SYSTEM)
            if row["status"] != MessageStatus.PENDING.value:
                refused.append((message_id, None))
                continue
        elif status != MessageStatus.PENDING.value:
            refused.append((message_id, None))
            continue
        lease_id = uuid.uuid4().hex
        delivery_count = row["delivery_count"] + 1
        tx.transition(
            row, MessageStatus.PROCESSING, EventType.MESSAGE_DELIVERED, actor,
            {"delivery_count": delivery_count, "lease_id": lease_id, "lease_expires_at": iso(lease_expires_at)},
            delivery_count=delivery_count, lease_id=lease_id, lease_expires_at=lease_expires_at,
        )
        delivered.append(row)
    return DeliveryOutcome(delivered, refused)


def _current_delivery(tx: Tx, message_id: int, lease_id: str | None) -> Row:
    row = tx.rows.get(message_id)
    if row is None:
        raise MessageNotFound(message_id)
    if row["status"] != MessageStatus.PROCESSING.value:
        raise NotProcessing(f"Message {message_id} is not being processed (status: {row['status']})")
    if lease_id is not None and lease_id != row["lease_id"]:
        raise StaleLease(f"Lease {lease_id} of message {message_id} is no longer current; it was redelivered")
    return row


def ack(tx: Tx, message_id: int, lease_id: str | None, actor: str) -> Row:
    row = _current_delivery(tx, message_id, lease_id)
    tx.transition(row, MessageStatus.PROCESSED, EventType.MESSAGE_ACKED, actor, {"lease_id": row["lease_id"]},
                  lease_id=None, lease_expires_at=None)
    return row


def nack(tx: Tx, queue: Queue, message_id: int, lease_id: str | None, requeue: bool, reason: str | None,
         actor: str) -> Row:
    row = _current_delivery(tx, message_id, lease_id)
    limit = queue.settings.max_deliveries
    if requeue and row["delivery_count"] >= limit:
        _fail(tx, row, f"delivery limit of {limit} reached; last nack: {reason or 'no reason given'}", actor)
    else:
        status = MessageStatus.PENDING if requeue else MessageStatus.FAILED
        tx.transition(
            row, status, EventType.MESSAGE_NACKED, actor,
            {"requeue": requeue, "reason": reason, "lease_id": row["lease_id"]},
            lease_id=None, lease_expires_at=None, last_error=reason if reason is not None else row["last_error"],
        )
    return row


def expire_leases(tx: Tx, queues_by_id: dict[int, Queue], ids: list[int]) -> list[Row]:
    """Journal the return of deliveries whose lease ran out (Redis already moved them back to ready)."""
    changed = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["status"] != MessageStatus.PROCESSING.value:
            continue
        if (row["lease_expires_at"] or 0) > tx.now + LEASE_SLACK_SECONDS:
            continue  # extended meanwhile: the copy in ready is stale and will be refused at delivery
        _expire(tx, row, queues_by_id[row["queue_id"]], SYSTEM)
        changed.append(row)
    return changed


def _expire(tx: Tx, row: Row, queue: Queue, actor: str) -> None:
    limit = queue.settings.max_deliveries
    if row["delivery_count"] >= limit:
        _fail(tx, row, f"delivery limit of {limit} reached; last lease expired unacknowledged", actor)
        return
    tx.transition(
        row, MessageStatus.PENDING, EventType.MESSAGE_LEASE_EXPIRED, actor,
        {"delivery_count": row["delivery_count"], "lease_id": row["lease_id"]},
        lease_id=None, lease_expires_at=None,
    )


def _fail(tx: Tx, row: Row, reason: str, actor: str) -> None:
    tx.transition(row, MessageStatus.FAILED, EventType.MESSAGE_FAILED, actor, {"reason": reason},
                  lease_id=None, lease_expires_at=None, last_error=reason)


# -- users -------------------------------------------------------------------------------------------------------


def add_user(tx: Tx, exists: bool, username: str, password_hash: str, roles: list[str]) -> None:
    """Runs alone in its transaction, so `exists` (read just before) still holds."""
    if exists:
        raise UserExists(f"User '{username}' already exists")
    tx.execute(SQL["insert_user"], username=username, password_hash=password_hash,
               roles=",".join(sorted(roles)), created_at=tx.now)


def remove_user(tx: Tx, exists: bool, username: str) -> None:
    if not exists:
        raise UserNotFound(f"User '{username}' not found")
    tx.execute(SQL["delete_user"], username=username)


def _settings_json(settings: QueueSettings) -> str:
    data: dict[str, Any] = settings.as_dict()
    return orjson.dumps(data).decode()
