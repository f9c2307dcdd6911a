"""The journal: SQLite in WAL mode, the source of truth for queues, messages, events and users.

One writer task owns every write. Concurrent callers' operations are applied to one transaction and committed
together (group commit: one fsync per batch with `synchronous=FULL`), and each caller is answered only once that
transaction is durable. Reads use a second connection and never wait for the writer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import orjson

from app.errors import BrokerError, JournalUnavailable, QueueNotFound
from app.models import Event, Message, MessageStatus, NewMessage, PublishResult, Queue, QueueSettings, Role, User
from app.stores import journal_ops as ops
from app.stores import message_ops as mops
from app.stores.journal_tx import (
    MESSAGE_COLUMNS,
    Counters,
    Row,
    Tx,
    event_from_row,
    event_params,
    message_from_row,
    queue_from_row,
    row_from_tuple,
)
from app.stores.sql_blocks import load

log = logging.getLogger(__name__)
SQL = load("journal.sql")
T = TypeVar("T")
EventListener = Callable[[list[Event]], None]


@dataclass
class _Op:
    apply: Callable[[Tx], Any]
    future: asyncio.Future[Any]
    ids: tuple[int, ...] = ()
    alone: bool = False  # queue and user changes commit in a transaction of their own
    idempotency_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Transition:
    """A message after a change, with the name of the queue it was in before (a dead-letter or redrive moves it)."""

    message: Message
    from_queue: str


@dataclass
class JournalStats:
    commits: int = 0
    operations: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    last_error: str | None = None


class SqliteJournalStore:
    """Async journal store; open it with `async with`. One process owns a journal file at a time."""

    def __init__(self, path: Path, *, sync: str = "full", batch_max: int = 2000, read_only: bool = False) -> None:
        self.path = path
        self.sync = sync
        self.batch_max = batch_max
        self.read_only = read_only
        self.stats = JournalStats()
        self.healthy = True
        self._listeners: list[EventListener] = []
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._queues: dict[int, Queue] = {}
        self._counts: dict[int, Counter[str]] = {}
        self._counters = Counters(0, 0, 0)

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
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in ("journal_mode = WAL", f"synchronous = {self.sync.upper()}", "busy_timeout = 5000"):
                await self._writer.execute(f"PRAGMA {pragma}")
            await self._writer.executescript(SQL["schema"])
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA query_only = 1")
        reader = self._reader
        async with reader.execute(SQL["max_ids"]) as cur:
            row = await cur.fetchone()
            assert row is not None
            self._counters = Counters(message_id=row[0], seq=row[1], queue_id=row[2])
        queue_rows = await reader.execute_fetchall(SQL["select_queues"])
        self._queues = {q.id: q for q in (queue_from_row(tuple(r)) for r in queue_rows)}
        self._counts = {queue_id: Counter() for queue_id in self._queues}
        for queue_id, status, n in await reader.execute_fetchall(SQL["count_by_queue_status"]):
            self._counts.setdefault(queue_id, Counter())[status] = n
        if not self.read_only:
            self._task = asyncio.create_task(self._write_loop(), name="journal-writer")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            await self._inbox.put(None)  # the writer drains what was queued before this, then stops
            await self._task
            self._task = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    def add_listener(self, listener: EventListener) -> None:
        """Called with each committed batch's events, after the commit."""
        self._listeners.append(listener)

    # -- reads ----------------------------------------------------------------------------------------------------

    def queues(self) -> list[Queue]:
        return sorted(self._queues.values(), key=lambda q: q.name)

    def queue(self, name: str) -> Queue:
        for queue in self._queues.values():
            if queue.name == name:
                return queue
        raise QueueNotFound(name)

    def counts(self, queue: Queue) -> dict[str, int]:
        counter = self._counts.get(queue.id, Counter())
        return {status.value: counter.get(status.value, 0) for status in MessageStatus}

    async def oldest_pending_at(self, queue: Queue) -> float | None:
        rows = await self._read(SQL["oldest_pending"], queue_id=queue.id)
        return rows[0][0] if rows else None

    async def get_message(self, message_id: int) -> Message | None:
        rows = await self._read(SQL["select_message"], id=message_id)
        return self._message(row_from_tuple(rows[0])) if rows else None

    async def history(self, message_id: int) -> list[Event]:
        return [event_from_row(r) for r in await self._read(SQL["message_events"], message_id=message_id)]

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
        return await self._submit(lambda tx: ops.delete_queue(tx, queue, self.counts(queue), actor), alone=True)

    async def purge_queue(self, queue: Queue, actor: str) -> int:
        return await self._submit(lambda tx: ops.purge_queue(tx, queue, self.counts(queue), actor), alone=True)

    async def publish(self, queue: Queue, items: list[NewMessage], actor: str) -> list[PublishResult]:
        keys = tuple(mops.scope_key(queue, i.idempotency_key) for i in items if i.idempotency_key is not None)
        outcomes: list[tuple[PublishResult, Row | None]] = await self._submit(
            lambda tx: mops.publish(tx, queue, items, actor), idempotency_keys=keys
        )
        return [result for result, _ in outcomes]

    async def record_deliveries(
        self, queue: Queue, ids: list[int], lease_expires_at: float, actor: str
    ) -> tuple[list[Message], list[tuple[int, float | None]]]:
        outcome: mops.DeliveryOutcome = await self._submit(
            lambda tx: mops.record_deliveries(tx, queue, ids, lease_expires_at, actor), ids=ids
        )
        return [message_from_row(r, queue.name) for r in outcome.delivered], outcome.refused

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
                      idempotency_keys: tuple[str, ...] = ()) -> T:
        if self._task is None or self._task.done():
            raise JournalUnavailable("The journal is not accepting writes")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._inbox.put(_Op(apply, future, tuple(ids), alone, idempotency_keys))
        return await future

    # -- the writer -------------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        stopping = False
        held: _Op | None = None
        while not stopping:
            first = held if held is not None else await self._inbox.get()
            held = None
            if first is None:
                break
            batch = [first]
            while not first.alone and len(batch) < self.batch_max and not self._inbox.empty():
                op = self._inbox.get_nowait()
                if op is None:
                    stopping = True
                    break
                if op.alone:
                    held = op
                    break
                batch.append(op)
            await self._commit(batch)
        if held is not None:
            await self._commit([held])

    async def _commit(self, batch: list[_Op]) -> None:
        started = time.perf_counter()
        saved = Counters(**vars(self._counters))
        try:
            rows = await self._load_rows({i for op in batch for i in op.ids})
            keys = await self._load_idempotency({k for op in batch for k in op.idempotency_keys})
        except Exception as exc:  # any failure to read means nothing of this batch may be answered as done
            self._fail_batch(batch, exc, saved)
            return
        tx = Tx(rows=rows, counters=self._counters, queues_by_id=dict(self._queues), counts=self._counts,
                idempotency=keys)
        outcomes: list[tuple[_Op, Any, BaseException | None]] = []
        for op in batch:
            try:
                outcomes.append((op, op.apply(tx), None))
            except BrokerError as exc:
                outcomes.append((op, None, exc))
        try:
            await self._write(tx)
        except Exception as exc:  # disk full, I/O error, locked, closed: fail closed, never half-answer
            self._fail_batch(batch, exc, saved)
            return
        self.healthy = True
        self._queues = tx.queues_by_id
        for (queue_id, status), delta in tx.count_deltas.items():
            self._counts.setdefault(queue_id, Counter())[status] += delta
        for queue_id in list(self._counts):
            if queue_id not in self._queues:
                del self._counts[queue_id]
        self._record(len(batch), time.perf_counter() - started)
        for op, result, error in outcomes:
            if op.future.done():  # the caller went away (cancelled); the change is committed regardless
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)
        if tx.events:
            for listener in self._listeners:
                try:
                    listener(tx.events)
                except Exception:  # a listener must never undo or block a commit
                    log.exception("journal event listener failed")

    async def _load_rows(self, ids: set[int]) -> dict[int, Row]:
        if not ids:
            return {}
        assert self._writer is not None
        found = await self._writer.execute_fetchall(SQL["select_messages_by_ids"], {"ids": orjson.dumps(list(ids))})
        return {r[0]: row_from_tuple(r) for r in found}

    async def _load_idempotency(self, keys: set[str]) -> dict[str, tuple[int, float, str | None]]:
        if not keys:
            return {}
        assert self._writer is not None
        found = await self._writer.execute_fetchall(SQL["select_idempotency_keys"], {"keys": orjson.dumps(list(keys))})
        return {r[0]: (r[1], r[2], r[3]) for r in found}

    async def _write(self, tx: Tx) -> None:
        conn = self._writer
        assert conn is not None
        await conn.execute("BEGIN IMMEDIATE")
        try:
            if tx.inserted:
                await conn.executemany(SQL["insert_message"], tx.inserted)
            if tx.dirty:
                await conn.executemany(SQL["update_message"], list(tx.dirty.values()))
            if tx.deleted:
                await conn.executemany(SQL["delete_message"], [{"id": i} for i in tx.deleted])
            for sql, params in tx.statements:
                await conn.execute(sql, params)
            if tx.events:
                await conn.executemany(SQL["insert_event"], [event_params(e) for e in tx.events])
            await conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_error:
                log.error("journal rollback failed: %s", rollback_error)
            raise

    def _fail_batch(self, batch: list[_Op], exc: BaseException, saved: Counters) -> None:
        self._counters.message_id, self._counters.seq, self._counters.queue_id = (
            saved.message_id, saved.seq, saved.queue_id,
        )
        self.healthy = False
        self.stats.last_error = f"{exc.__class__.__name__}: {exc}"
        log.error("journal commit failed, %d operations refused: %s", len(batch), exc)
        error = JournalUnavailable(f"The journal cannot commit right now ({exc.__class__.__name__}); retry later")
        for op in batch:
            if not op.future.done():
                op.future.set_exception(error)

    def _record(self, size: int, seconds: float) -> None:
        self.stats.commits += 1
        self.stats.operations += size
        self.stats.last_batch_size = size
        self.stats.last_commit_seconds = seconds


def _user(row: tuple[Any, ...]) -> User:
    username, _hash, roles, created_at = row
    return User(username, frozenset(Role(r) for r in roles.split(",") if r), created_at)


__all__ = ["MESSAGE_COLUMNS", "JournalStats", "SqliteJournalStore", "Transition"]
