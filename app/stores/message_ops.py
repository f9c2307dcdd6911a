"""The journal's message operations: the life of a message, one validated transition (and one event) at a time.

Each operation reads the rows its batch loaded, raises a BrokerError before changing anything when it refuses,
then changes rows through `Tx.transition`. The journal arbitrates deliveries: Redis may hand out a stale copy of an
id after a fault, and only a message whose journaled state allows it is delivered.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from app.errors import MessageNotFound, NotProcessing, RateLimited, StaleLease
from app.models import EventType, MessageStatus, NewMessage, PublishResult, Queue, iso
from app.stores.journal_tx import Row, Tx, new_message_row
from app.stores.sql_blocks import load

SQL = load("journal.sql")
SYSTEM = "system"
# A lease or delay the Redis side saw run out may look a few ms alive to the journal (rounding, clock reads).
SLACK_SECONDS = 0.5
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600.0
PENDING, DELAYED, PROCESSING = MessageStatus.PENDING.value, MessageStatus.DELAYED.value, MessageStatus.PROCESSING.value
LIVE = (PENDING, DELAYED, PROCESSING)


@dataclass(frozen=True)
class Moved:
    """A message after a transition, and the queue it was in before (it differs after a dead-letter or redrive)."""

    row: Row
    from_queue_id: int


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: list[Row]
    # Ids Redis handed out that the journal refused (a stale copy): each with the deadline of the lease that
    # legitimately holds it, if any, so the caller can restore that lease in Redis.
    refused: list[tuple[int, float | None]]
    dead_lettered: list[Moved]


def scope_key(queue: Queue, key: str) -> str:
    return f"{queue.id}:{key}"


def publish(tx: Tx, queue: Queue, items: list[NewMessage], actor: str) -> list[PublishResult]:
    tx.require_queue(queue)
    fresh = [item for item in items if _duplicate(tx, queue, item) is None]
    limit = queue.settings.max_length
    if limit is not None and tx.live_count(queue.id, LIVE) + len(fresh) > limit:
        raise RateLimited(f"Queue '{queue.name}' is full ({limit} messages); retry later", 1, code="queue_full")
    results: list[PublishResult] = []
    for item in items:
        duplicate = _duplicate(tx, queue, item)
        if duplicate is not None:
            results.append(duplicate)
            continue
        status = MessageStatus.DELAYED if item.delay_seconds > 0 else MessageStatus.PENDING
        row = new_message_row(queue, item.content, item.headers, status, tx.now, tx.now + item.delay_seconds)
        tx.insert_message(row, actor)
        if item.idempotency_key is not None:
            scope = scope_key(queue, item.idempotency_key)
            tx.idempotency[scope] = (row["id"], tx.now, status.value)
            tx.execute(SQL["upsert_idempotency_key"], scope_key=scope, message_id=row["id"], created_at=tx.now)
        results.append(PublishResult(row["id"], status, available_at=row["available_at"]))
    return results


def _duplicate(tx: Tx, queue: Queue, item: NewMessage) -> PublishResult | None:
    if item.idempotency_key is None:
        return None
    found = tx.idempotency.get(scope_key(queue, item.idempotency_key))
    if found is None or found[1] < tx.now - IDEMPOTENCY_WINDOW_SECONDS:
        return None
    message_id, _, status = found
    current = tx.rows.get(message_id)
    if current is not None:  # changed earlier in this batch
        status = current["status"]
    return PublishResult(message_id, MessageStatus(status) if status else None, duplicate=True)


def record_deliveries(tx: Tx, queue: Queue, ids: list[int], lease_expires_at: float, actor: str) -> DeliveryOutcome:
    """Journal the hand-off of ids that Redis moved to processing. Only a pending message, a delayed one that is
    due, or one whose lease ran out before the reaper saw it is delivered; any other id is a stale copy."""
    tx.require_queue(queue)
    delivered: list[Row] = []
    refused: list[tuple[int, float | None]] = []
    moved: list[Moved] = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["queue_id"] != queue.id:
            refused.append((message_id, None))
            continue
        status = row["status"]
        if status == PROCESSING and row["lease_expires_at"] > tx.now:
            refused.append((message_id, row["lease_expires_at"]))
            continue
        if status == PROCESSING:
            _expire(tx, row, queue)
            if row["queue_id"] != queue.id:  # dead-lettered at its delivery limit: it belongs to the DLQ now
                refused.append((message_id, None))
                moved.append(Moved(row, queue.id))
                continue
        due = status == DELAYED and row["available_at"] <= tx.now + SLACK_SECONDS
        if row["status"] != PENDING and not due:
            refused.append((message_id, None))
            continue
        lease_id = secrets.token_hex(16)
        count = row["delivery_count"] + 1
        tx.transition(
            row, MessageStatus.PROCESSING, EventType.MESSAGE_DELIVERED, actor,
            {"delivery_count": count, "lease_id": lease_id, "lease_expires_at": iso(lease_expires_at)},
            delivery_count=count, lease_id=lease_id, lease_expires_at=lease_expires_at, delivered_at=tx.now,
        )
        delivered.append(row)
    return DeliveryOutcome(delivered, refused, moved)


def current_delivery(tx: Tx, message_id: int, lease_id: str | None) -> Row:
    row = tx.rows.get(message_id)
    if row is None:
        raise MessageNotFound(message_id)
    if row["status"] != PROCESSING:
        raise NotProcessing(f"Message {message_id} is not being processed (status: {row['status']})")
    if lease_id is not None and lease_id != row["lease_id"]:
        raise StaleLease(f"Lease {lease_id} of message {message_id} is no longer current; it was redelivered")
    return row


def ack(tx: Tx, message_id: int, lease_id: str | None, actor: str) -> Row:
    row = current_delivery(tx, message_id, lease_id)
    took = round(tx.now - row["delivered_at"], 6) if row["delivered_at"] else None
    tx.transition(row, MessageStatus.PROCESSED, EventType.MESSAGE_ACKED, actor,
                  {"lease_id": row["lease_id"], "processing_seconds": took}, lease_id=None, lease_expires_at=None)
    return row


def nack(tx: Tx, message_id: int, lease_id: str | None, requeue: bool, delay: float, reason: str | None,
         actor: str) -> Moved:
    """Requeue (now or after `delay`), or fail. Past the delivery limit, or without requeue, the message fails:
    it moves to the queue's dead-letter queue when it has one."""
    row = current_delivery(tx, message_id, lease_id)
    from_queue_id = row["queue_id"]
    queue = tx.queues_by_id[from_queue_id]
    limit = queue.settings.max_deliveries
    last_error = reason if reason is not None else row["last_error"]
    if not requeue and tx.queue_named(queue.settings.dead_letter_queue) is not None:
        _fail(tx, row, queue, reason or "rejected by the consumer without requeue", actor)
    elif not requeue:
        tx.transition(row, MessageStatus.FAILED, EventType.MESSAGE_NACKED, actor,
                      {"requeue": False, "reason": reason, "lease_id": row["lease_id"]},
                      lease_id=None, lease_expires_at=None, last_error=last_error)
    elif row["delivery_count"] >= limit:
        _fail(tx, row, queue, f"delivery limit of {limit} reached; last nack: {reason or 'no reason given'}", actor)
    else:
        status = MessageStatus.DELAYED if delay > 0 else MessageStatus.PENDING
        tx.transition(
            row, status, EventType.MESSAGE_NACKED, actor,
            {"requeue": True, "reason": reason, "lease_id": row["lease_id"], "delay_seconds": delay},
            lease_id=None, lease_expires_at=None, last_error=last_error, available_at=tx.now + delay,
        )
    return Moved(row, from_queue_id)


def extend(tx: Tx, message_id: int, lease_id: str | None, seconds: float, actor: str) -> Row:
    row = current_delivery(tx, message_id, lease_id)
    deadline = tx.now + seconds
    tx.transition(row, MessageStatus.PROCESSING, EventType.MESSAGE_LEASE_EXTENDED, actor,
                  {"lease_id": row["lease_id"], "lease_expires_at": iso(deadline)}, lease_expires_at=deadline)
    return row


def expire_leases(tx: Tx, ids: list[int]) -> list[Moved]:
    """Journal the return of deliveries whose lease ran out (Redis already moved them back to ready)."""
    changed = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["status"] != PROCESSING:
            continue
        if (row["lease_expires_at"] or 0) > tx.now + SLACK_SECONDS:
            continue  # extended meanwhile: the copy in ready is stale and will be refused at delivery
        from_queue_id = row["queue_id"]
        _expire(tx, row, tx.queues_by_id[from_queue_id])
        changed.append(Moved(row, from_queue_id))
    return changed


def promote_delayed(tx: Tx, ids: list[int]) -> list[Row]:
    """Journal that delayed messages became pending (Redis already moved them to ready)."""
    promoted = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["status"] != DELAYED or row["available_at"] > tx.now + SLACK_SECONDS:
            continue
        tx.transition(row, MessageStatus.PENDING, EventType.MESSAGE_REQUEUED, SYSTEM, {"reason": "delay elapsed"})
        promoted.append(row)
    return promoted


def redrive(tx: Tx, queue: Queue, ids: list[int], actor: str) -> list[Moved]:
    """Failed messages back to pending; messages a dead-letter queue holds back to the queue they came from."""
    tx.require_queue(queue)
    moved = []
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or row["queue_id"] != queue.id:
            continue
        origin = tx.queue_named(row["dead_lettered_from"])
        target = origin if origin is not None else queue
        failed = row["status"] == MessageStatus.FAILED.value
        waiting_in_dlq = row["status"] == PENDING and origin is not None
        if not (failed or waiting_in_dlq):  # acked, delivered or delayed since it was picked: leave it
            continue
        tx.transition(
            row, MessageStatus.PENDING, EventType.MESSAGE_REDRIVEN, actor, {"from": queue.name, "to": target.name},
            queue_id=target.id, delivery_count=0, dead_lettered_from=None, available_at=tx.now,
        )
        moved.append(Moved(row, queue.id))
    return moved


def prune(tx: Tx, ids: list[int], cutoffs: dict[int, float]) -> int:
    """Delete terminal messages older than their queue's retention (cutoff per queue id)."""
    pruned = 0
    for message_id in ids:
        row = tx.rows.get(message_id)
        if row is None or MessageStatus(row["status"]) not in (MessageStatus.PROCESSED, MessageStatus.FAILED):
            continue
        if row["updated_at"] >= cutoffs.get(row["queue_id"], 0):
            continue
        tx.delete_message(row, SYSTEM, {"reason": "retention", "status": row["status"]})
        pruned += 1
    return pruned


def _expire(tx: Tx, row: Row, queue: Queue) -> None:
    limit = queue.settings.max_deliveries
    if row["delivery_count"] >= limit:
        _fail(tx, row, queue, f"delivery limit of {limit} reached; last lease expired unacknowledged", SYSTEM)
        return
    tx.transition(
        row, MessageStatus.PENDING, EventType.MESSAGE_LEASE_EXPIRED, SYSTEM,
        {"delivery_count": row["delivery_count"], "lease_id": row["lease_id"]},
        lease_id=None, lease_expires_at=None,
    )


def _fail(tx: Tx, row: Row, queue: Queue, reason: str, actor: str) -> None:
    """Fail a message: into the queue's dead-letter queue when it has one (a fresh start there), else `failed`."""
    dlq = tx.queue_named(queue.settings.dead_letter_queue)
    if dlq is not None and dlq.id != queue.id:
        tx.transition(
            row, MessageStatus.PENDING, EventType.MESSAGE_DEAD_LETTERED, actor,
            {"reason": reason, "dead_letter_queue": dlq.name, "delivery_count": row["delivery_count"]},
            queue_id=dlq.id, dead_lettered_from=queue.name, delivery_count=0, lease_id=None,
            lease_expires_at=None, last_error=reason, available_at=tx.now,
        )
        return
    tx.transition(row, MessageStatus.FAILED, EventType.MESSAGE_FAILED, actor, {"reason": reason},
                  lease_id=None, lease_expires_at=None, last_error=reason)
