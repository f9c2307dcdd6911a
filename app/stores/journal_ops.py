"""The journal's write operations on queues and users (message operations are in message_ops.py).

An operation raises a BrokerError before it changes anything, so a refused operation never leaves a half-applied
change in the batch it shares with others. Each accepted change journals exactly one event (DESIGN.md, invariant 5).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

from app.errors import (
    QueueExists,
    UserExists,
    UserNotFound,
)
from app.models import EventType, MessageStatus, Queue, QueueSettings
from app.stores.journal_tx import Tx
from app.stores.sql_blocks import load

SQL = load("journal.sql")
SYSTEM = "system"


# -- queues ------------------------------------------------------------------------------------------------------


def create_queue(tx: Tx, name: str, settings: QueueSettings, actor: str) -> Queue:
    if any(q.name == name for q in tx.queues_by_id.values()):
        raise QueueExists(name)
    tx.counters.queue_id += 1
    queue = Queue(tx.counters.queue_id, name, tx.now, tx.now, settings)
    tx.queues_by_id[queue.id] = queue
    tx.queues_changed = True
    tx.execute(SQL["insert_queue"], id=queue.id, name=name, created_at=tx.now, updated_at=tx.now,
               settings=_settings_json(settings))
    tx.event(EventType.QUEUE_CREATED, name, None, actor, {"settings": settings.as_dict()})
    return queue


def update_queue(tx: Tx, queue: Queue, settings: QueueSettings, actor: str) -> Queue:
    tx.require_queue(queue)
    updated = Queue(queue.id, queue.name, queue.created_at, tx.now, settings)
    tx.queues_by_id[queue.id] = updated
    tx.queues_changed = True
    tx.execute(SQL["update_queue"], id=queue.id, settings=_settings_json(settings), updated_at=tx.now)
    tx.event(EventType.QUEUE_UPDATED, queue.name, None, actor, {"settings": settings.as_dict()})
    return updated


def delete_queue(tx: Tx, queue: Queue, actor: str) -> int:
    """Delete a queue and all its messages: one event with how many went. Runs alone in its transaction."""
    tx.require_queue(queue)
    counts: Counter[str] = tx.counts.get(queue.id, Counter())
    del tx.queues_by_id[queue.id]
    tx.queues_changed = True
    tx.execute(SQL["delete_queue_messages"], queue_id=queue.id)
    tx.execute(SQL["delete_queue"], id=queue.id)
    tx.execute(SQL["delete_queue_counts"], queue_id=queue.id)
    tx.execute(SQL["delete_queue_idempotency_keys"], prefix=f"{queue.id}:%")
    for status, n in counts.items():
        tx.count_deltas[(queue.id, status)] -= n
    deleted = sum(counts.values())
    tx.event(EventType.QUEUE_DELETED, queue.name, None, actor, {"messages_deleted": deleted})
    return deleted


def purge_queue(tx: Tx, queue: Queue, actor: str) -> int:
    """Delete a queue's pending and delayed messages (not those being processed). Runs alone in its transaction."""
    tx.require_queue(queue)
    counts: Counter[str] = tx.counts.get(queue.id, Counter())
    tx.execute(SQL["purge_queue_messages"], queue_id=queue.id)
    purged = 0
    for status in (MessageStatus.PENDING.value, MessageStatus.DELAYED.value):  # processing ones stay
        n = counts.get(status, 0)
        tx.count_deltas[(queue.id, status)] -= n
        purged += n
    tx.event(EventType.QUEUE_PURGED, queue.name, None, actor, {"purged": purged})
    return purged


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
