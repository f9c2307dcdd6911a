"""The journal: SQLite in WAL mode, the source of truth for queues, messages, events and users.

Every write goes through the process's JournalWriter (group commit: one fsync per batch with `synchronous=FULL`,
each caller answered only once its batch is durable; safe with several processes on one journal). Reads use a
second connection and never wait for the writer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import orjson

from app.errors import JournalUnavailable, QueueNotFound
from app.models import (
    Event,
    Message,
    MessageStatus,
    NewMessage,
    PublishResult,
    Queue,
    QueueSettings,
    Role,
    User,
    is_valid_id,
)
from app.stores import journal_ops as ops
from app.stores import message_ops as mops
from app.stores.journal_connection import Op
from app.stores.journal_tx import (
    MESSAGE_COLUMNS,
    Row,
    Tx,
    event_from_row,
    message_from_row,
    queue_from_row,
    row_from_tuple,
)
from app.stores.journal_writer import EventListener, JournalStats, JournalWriter
from app.stores.sql_blocks import load

log = logging.getLogger(__name__)
SQL = load("journal.sql")
T = TypeVar("T")


@dataclass(frozen=True)
class Transition:
    """A message after a change, with the name of the queue it was in before (a dead-letter or redrive moves it)."""

    message: Message
    from_queue: str


class SqliteJournalStore:
    """Async journal store; open it with `async with`. One process owns a journal file at a time."""

    def __init__(self, path: Path, *, sync: str = "full", batch_max: int = 2000, read_only: bool = False) -> None:
        self.path = path
        self.sync = sync
        self.batch_max = batch_max
        self.read_only = read_only
        self._reader: aiosqlite.Connection | None = None
        self._writer: JournalWriter | None = None
        self._read_queues: dict[int, Queue] = {}  # read-only mode's queue list

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> SqliteJournalStore:
        try:
            await self._open()
        except sqlite3.DatabaseError as exc:
            await self._close_connections()
            raise JournalUnavailable(f"The journal at {self.path} cannot be opened: {exc}") from exc
        return self

    async def _open(self) -> None:
        if self.read_only:
            uri = f"file:{self.path}?mode=ro"
            self._reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout = 5000")
            await self.refresh()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = JournalWriter(self.path, sync=self.sync, batch_max=self.batch_max)
        try:
            await writer.start()  # creates the schema
        except BaseException:
            await writer.stop()
            raise
        self._writer = writer
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA query_only = 1")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None

    async def execute_on_writer(self, sql: str) -> list[Any]:
        """One statement on the writing connection, outside any batch (operators and tests: PRAGMAs)."""
        if self._writer is None:
            raise JournalUnavailable("The journal is open read-only")
        return await self._writer.run(self._writer.db.execute, sql)

    @property
    def stats(self) -> JournalStats:
        return self._writer.stats if self._writer else JournalStats()

    @property
    def healthy(self) -> bool:
        """The last commit succeeded and the writer is running (readiness turns red otherwise)."""
        return self._writer.healthy and self._writer.running if self._writer else True

    def add_listener(self, listener: EventListener) -> None:
        """Called with each committed batch's events, after the commit."""
        assert self._writer is not None
        self._writer.listeners.append(listener)

    def add_late_commit_listener(self, listener: Callable[[], None]) -> None:
        """Called when a commit lands whose callers were already answered "outcome unknown" (it was stuck)."""
        assert self._writer is not None
        self._writer.late_commit_listeners.append(listener)

    def add_commit_observer(self, observer: Callable[[int, float], None]) -> None:
        """Called with (operations, seconds) after each commit."""
        assert self._writer is not None
        self._writer.commit_observers.append(observer)

    @property
    def _queues(self) -> dict[int, Queue]:
        return self._writer.state.queues if self._writer else self._read_queues

    async def refresh(self) -> None:
        """Reload the queue list if another process changed the journal (cheap when nothing changed)."""
        if self._writer is not None:
            [(generation,)] = await self._read(SQL["generation"])
            if generation != self._writer.state.generation:
                await self._writer.run(self._writer.db.sync)  # between commits, on the writer's thread
            return
        self._read_queues = {q.id: q for q in await self._load_queues()}

    async def _load_queues(self) -> list[Queue]:
        return [queue_from_row(tuple(r)) for r in await self._read(SQL["select_queues"])]

    # -- reads ----------------------------------------------------------------------------------------------------

    def queues(self) -> list[Queue]:
        return sorted(self._queues.values(), key=lambda q: q.name)

    def queue(self, name: str) -> Queue:
        """A queue this process knows (see `find_queue` for one another process may just have created)."""
        for queue in self._queues.values():
            if queue.name == name:
                return queue
        raise QueueNotFound(name)

    async def find_queue(self, name: str) -> Queue:
        try:
            return self.queue(name)
        except QueueNotFound:
            await self.refresh()
            return self.queue(name)

    async def counts(self, queue: Queue) -> dict[str, int]:
        """Messages per status, kept by every commit (no scan)."""
        found = dict(await self._read(SQL["select_queue_counts"], queue_id=queue.id))
        return {status.value: int(found.get(status.value, 0)) for status in MessageStatus}

    async def oldest_pending_at(self, queue: Queue) -> float | None:
        rows = await self._read(SQL["oldest_pending"], queue_id=queue.id)
        return rows[0][0] if rows else None

    async def get_message(self, message_id: int) -> Message | None:
        if not is_valid_id(message_id):
            return None
        rows = await self._read(SQL["select_message"], id=message_id)
        return self._message(row_from_tuple(rows[0])) if rows else None

    async def history(self, message_id: int) -> list[Event]:
        if not is_valid_id(message_id):
            return []
        return [event_from_row(r) for r in await self._read(SQL["message_events"], message_id=message_id)]

    async def last_seq(self) -> int:
        [(seq,)] = await self._read(SQL["last_seq"])
        return int(seq)

    async def get_messages(self, ids: list[int]) -> list[Message]:
        rows = await self._read(SQL["select_messages_by_ids"], ids=orjson.dumps(ids).decode())
        return [self._message(row_from_tuple(r)) for r in rows]

    async def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        return [event_from_row(r) for r in await self._read(SQL["events_after"], after_seq=seq, limit=limit)]

    async def browse(self, queue: Queue, status: MessageStatus | None, after_id: int, limit: int) -> list[Message]:
        if status is None:
            rows = await self._read(SQL["browse_messages"], queue_id=queue.id, after_id=after_id, limit=limit)
        else:
            rows = await self._read(SQL["browse_messages_by_status"], queue_id=queue.id, status=status.value,
                                    after_id=after_id, limit=limit)
        return [self._message(row_from_tuple(r)) for r in rows]

    async def ids_by_status(
        self, queue: Queue, status: MessageStatus, chunk: int = 10_000
    ) -> AsyncIterator[list[tuple[int, float | None, float]]]:
        """Stream (id, lease_expires_at, available_at) of a queue's messages in one status, by id, in chunks."""
        after_id = 0
        while True:
            rows = await self._read(SQL["ids_by_status"], queue_id=queue.id, status=status.value,
                                    after_id=after_id, limit=chunk)
            if not rows:
                return
            yield [(r[0], r[1], r[2]) for r in rows]
            after_id = rows[-1][0]

    async def users(self) -> list[User]:
        return [_user(r) for r in await self._read(SQL["select_users"])]

    async def user_with_hash(self, username: str) -> tuple[User, str] | None:
        rows = await self._read(SQL["select_user"], username=username)
        return (_user(rows[0]), rows[0][1]) if rows else None

    async def ping(self) -> bool:
        try:
            await self._read("SELECT 1")
            return self.healthy
        except JournalUnavailable:
            return False

    async def _read(self, sql: str, **params: Any) -> list[Any]:
        if self._reader is None:
            raise JournalUnavailable("The journal is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"The journal cannot be read: {exc}") from exc

    def _message(self, row: Row) -> Message:
        queue = self._queues.get(row["queue_id"])
        return message_from_row(row, queue.name if queue else "")

    # -- writes ---------------------------------------------------------------------------------------------------

    async def create_queue(self, name: str, settings: QueueSettings, actor: str) -> Queue:
        return await self._submit(lambda tx: ops.create_queue(tx, name, settings, actor), alone=True)

    async def update_queue(self, queue: Queue, settings: QueueSettings, actor: str) -> Queue:
        return await self._submit(lambda tx: ops.update_queue(tx, queue, settings, actor), alone=True)

    async def delete_queue(self, queue: Queue, actor: str) -> int:
        return await self._submit(lambda tx: ops.delete_queue(tx, queue, actor), alone=True, counts_for=(queue.id,))

    async def purge_queue(self, queue: Queue, actor: str) -> int:
        return await self._submit(lambda tx: ops.purge_queue(tx, queue, actor), alone=True, counts_for=(queue.id,))

    def publish(self, queue: Queue, items: list[NewMessage], actor: str) -> asyncio.Future[list[PublishResult]]:
        """Queue a publish for the next group commit. The future resolves once it is durable; the publish commits
        even if nobody awaits the future any more (a caller that went away still needs its ids pushed)."""
        keys = tuple(mops.scope_key(queue, i.idempotency_key) for i in items if i.idempotency_key is not None)
        capped = (queue.id,) if queue.settings.max_length is not None else ()
        return self._queue_op(lambda tx: mops.publish(tx, queue, items, actor), idempotency_keys=keys,
                              rows=len(items), counts_for=capped)

    async def record_deliveries(
        self, queue: Queue, ids: list[int], lease_expires_at: float, actor: str
    ) -> tuple[list[Message], list[tuple[int, float | None]], list[Transition]]:
        """Deliveries made; ids refused (with the deadline of a lease that still holds them); messages that hit
        their delivery limit on the way and moved to a dead-letter queue."""
        outcome: mops.DeliveryOutcome = await self._submit(
            lambda tx: mops.record_deliveries(tx, queue, ids, lease_expires_at, actor), ids=ids
        )
        delivered = [message_from_row(r, queue.name) for r in outcome.delivered]
        return delivered, outcome.refused, [self._transition(m) for m in outcome.dead_lettered]

    async def ack(self, message_id: int, lease_id: str | None, actor: str) -> Message:
        row: Row = await self._submit(lambda tx: mops.ack(tx, message_id, lease_id, actor), ids=(message_id,))
        return self._message(row)

    async def nack(self, message_id: int, lease_id: str | None, requeue: bool, delay: float, reason: str | None,
                   actor: str) -> Transition:
        moved: mops.Moved = await self._submit(
            lambda tx: mops.nack(tx, message_id, lease_id, requeue, delay, reason, actor), ids=(message_id,)
        )
        return self._transition(moved)

    async def extend(self, message_id: int, lease_id: str | None, seconds: float, actor: str) -> Message:
        row: Row = await self._submit(lambda tx: mops.extend(tx, message_id, lease_id, seconds, actor),
                                      ids=(message_id,))
        return self._message(row)

    async def expire_leases(self, ids: list[int]) -> list[Transition]:
        moved: list[mops.Moved] = await self._submit(lambda tx: mops.expire_leases(tx, ids), ids=ids)
        return [self._transition(m) for m in moved]

    async def promote_delayed(self, ids: list[int]) -> int:
        return len(await self._submit(lambda tx: mops.promote_delayed(tx, ids), ids=ids))

    async def redrive(self, queue: Queue, limit: int, actor: str) -> list[Transition]:
        ids = [r[0] for r in await self._read(SQL["redrivable_ids"], queue_id=queue.id, limit=limit)]
        moved: list[mops.Moved] = await self._submit(lambda tx: mops.redrive(tx, queue, ids, actor), ids=ids)
        return [self._transition(m) for m in moved]

    async def prune_expired(self, now: float, limit: int = 1000) -> int:
        """Delete terminal messages past their queue's retention; returns how many went."""
        cutoffs = {q.id: now - q.settings.retention_seconds for q in self._queues.values()
                   if q.settings.retention_seconds}
        ids: list[int] = []
        for queue_id, cutoff in cutoffs.items():
            rows = await self._read(SQL["expired_terminal_ids"], queue_id=queue_id, cutoff=cutoff, limit=limit)
            ids.extend(r[0] for r in rows)
        if not ids:
            return 0
        pruned: int = await self._submit(lambda tx: mops.prune(tx, ids, cutoffs), ids=ids)
        return pruned

    async def prune_idempotency_keys(self, before: float) -> None:
        await self._submit(lambda tx: tx.execute(SQL["delete_idempotency_keys_before"], cutoff=before), alone=True)

    def _transition(self, moved: mops.Moved) -> Transition:
        source = self._queues.get(moved.from_queue_id)
        return Transition(self._message(moved.row), source.name if source else "")

    async def add_user(self, username: str, password_hash: str, roles: Iterable[Role]) -> None:
        exists = await self.user_with_hash(username) is not None
        names = [r.value for r in roles]
        await self._submit(lambda tx: ops.add_user(tx, exists, username, password_hash, names), alone=True)

    async def remove_user(self, username: str) -> None:
        exists = await self.user_with_hash(username) is not None
        await self._submit(lambda tx: ops.remove_user(tx, exists, username), alone=True)

    async def _submit(self, apply: Callable[[Tx], T], *, ids: Iterable[int] = (), alone: bool = False,
                      idempotency_keys: tuple[str, ...] = (), counts_for: tuple[int, ...] = ()) -> T:
        ids = tuple(ids)
        result: T = await self._queue_op(apply, ids=ids, alone=alone, idempotency_keys=idempotency_keys,
                                         rows=max(1, len(ids)), counts_for=counts_for)
        return result

    def _queue_op(self, apply: Callable[[Tx], T], *, ids: tuple[int, ...] = (), alone: bool = False,
                  idempotency_keys: tuple[str, ...] = (), rows: int = 1,
                  counts_for: tuple[int, ...] = ()) -> asyncio.Future[T]:
        if self._writer is None:
            raise JournalUnavailable("The journal is open read-only")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return self._writer.submit(Op(apply, future, ids, alone, idempotency_keys, rows, counts_for))


def _user(row: tuple[Any, ...]) -> User:
    username, _hash, roles, created_at = row
    return User(username, frozenset(Role(r) for r in roles.split(",") if r), created_at)


__all__ = ["MESSAGE_COLUMNS", "JournalStats", "SqliteJournalStore", "Transition"]
