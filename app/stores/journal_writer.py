"""The journal's one writer per process: group commit, and safe sharing of one journal by several processes.

Operations queue up while a transaction commits; the next transaction takes all of them (up to `batch_max`), so
one fsync covers many callers, and each caller is answered only after the commit. Several broker processes may
share a journal: each transaction runs under an exclusive `flock` on a lock file (a waiting writer is woken by
the kernel the moment the lock is free, no sleep-and-retry), reads the next ids inside the transaction, and bumps a
write generation; a process that finds the generation moved reloads its queue and count caches first.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from app.errors import BrokerError, JournalUnavailable
from app.models import Event, Queue
from app.stores.journal_tx import Counters, Row, Tx, event_params, queue_from_row, row_from_tuple
from app.stores.sql_blocks import load

log = logging.getLogger(__name__)
SQL = load("journal.sql")
EventListener = Callable[[list[Event]], None]


@dataclass
class Op:
    apply: Callable[[Tx], Any]
    future: asyncio.Future[Any]
    ids: tuple[int, ...] = ()
    alone: bool = False  # queue and user changes commit in a transaction of their own
    idempotency_keys: tuple[str, ...] = ()


@dataclass
class JournalStats:
    commits: int = 0
    operations: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    last_error: str | None = None


@dataclass
class SharedState:
    """What this process caches of the journal; valid while no other process has written since."""

    queues: dict[int, Queue] = field(default_factory=dict)
    counts: dict[int, Counter[str]] = field(default_factory=dict)
    counters: Counters = field(default_factory=lambda: Counters(0, 0, 0))
    generation: int = -1


class JournalWriter:
    def __init__(self, conn: aiosqlite.Connection, lock_path: Path, *, batch_max: int) -> None:
        self.conn = conn
        self.batch_max = batch_max
        self.stats = JournalStats()
        self.state = SharedState()
        self.healthy = True
        self.listeners: list[EventListener] = []
        self.commit_observers: list[Callable[[int, float], None]] = []  # (operations, seconds) per commit
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._inbox: asyncio.Queue[Op | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self.locked():
            if not await self.conn.execute_fetchall(SQL["counts_ready"]):
                await self.conn.executescript(f"BEGIN IMMEDIATE;\n{SQL['init_counts']}\nCOMMIT;")
            await self._sync()
        self._task = asyncio.create_task(self._loop(), name="journal-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._inbox.put_nowait(None)  # the loop drains what was queued before this, then stops
            await self._task
            self._task = None
        os.close(self._lock_fd)

    async def submit(self, op: Op) -> Any:
        if self._task is None or self._task.done():
            raise JournalUnavailable("The journal is not accepting writes")
        self._inbox.put_nowait(op)
        return await op.future

    # -- cross-process lock and caches ----------------------------------------------------------------------------

    async def _acquire(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # uncontended: no thread hop
        except BlockingIOError:
            await asyncio.get_running_loop().run_in_executor(None, fcntl.flock, self._lock_fd, fcntl.LOCK_EX)

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _sync(self) -> None:
        """Read the next ids and, if another process wrote since our last commit, reload the caches."""
        [(message_id, seq, queue_id, generation)] = await self.conn.execute_fetchall(SQL["write_state"])
        self.state.counters = Counters(message_id, seq, queue_id)
        if generation != self.state.generation:
            queue_rows = await self.conn.execute_fetchall(SQL["select_queues"])
            self.state.queues = {q.id: q for q in (queue_from_row(tuple(r)) for r in queue_rows)}
            counts: dict[int, Counter[str]] = {queue_id: Counter() for queue_id in self.state.queues}
            for q_id, status, n in await self.conn.execute_fetchall(SQL["select_counts"]):
                counts.setdefault(q_id, Counter())[status] = n
            self.state.counts = counts
            self.state.generation = generation

    # -- the loop -------------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        stopping = False
        held: Op | None = None
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

    async def _commit(self, batch: list[Op]) -> None:
        started = time.perf_counter()
        async with self.locked():
            try:
                await self.conn.execute("BEGIN IMMEDIATE")
                await self._sync()
                tx = Tx(
                    rows=await self._load_rows({i for op in batch for i in op.ids}),
                    counters=self.state.counters,
                    queues_by_id=dict(self.state.queues),
                    counts=self.state.counts,
                    idempotency=await self._load_idempotency({k for op in batch for k in op.idempotency_keys}),
                )
                outcomes = [self._apply(op, tx) for op in batch]
                await self._write(tx)
            except Exception as exc:  # disk full, I/O error, locked, closed: fail closed, never half-answer
                await self._rollback()
                self._fail(batch, exc)
                return
        self.healthy = True
        self._adopt(tx)
        self._record(len(batch), time.perf_counter() - started)
        for op, result, error in outcomes:
            if op.future.done():  # the caller went away (cancelled); the change is committed regardless
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)
        if tx.events:
            for listener in self.listeners:
                try:
                    listener(tx.events)
                except Exception:  # a listener must never undo or block a commit
                    log.exception("journal event listener failed")

    @staticmethod
    def _apply(op: Op, tx: Tx) -> tuple[Op, Any, BaseException | None]:
        try:
            return op, op.apply(tx), None
        except BrokerError as exc:  # refused before it changed anything; the rest of the batch goes on
            return op, None, exc

    async def _load_rows(self, ids: set[int]) -> dict[int, Row]:
        ids = {i for i in ids if 0 < i < 2**63}  # others cannot exist (and would not bind)
        if not ids:
            return {}
        found = await self.conn.execute_fetchall(SQL["select_messages_by_ids"], {"ids": orjson.dumps(list(ids))})
        return {r[0]: row_from_tuple(r) for r in found}

    async def _load_idempotency(self, keys: set[str]) -> dict[str, tuple[int, float, str | None]]:
        if not keys:
            return {}
        found = await self.conn.execute_fetchall(SQL["select_idempotency_keys"], {"keys": orjson.dumps(list(keys))})
        return {r[0]: (r[1], r[2], r[3]) for r in found}

    async def _write(self, tx: Tx) -> None:
        conn = self.conn
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
        deltas = [{"queue_id": q, "status": s, "delta": d} for (q, s), d in tx.count_deltas.items()
                  if d and q in tx.queues_by_id]
        if deltas:
            await conn.executemany(SQL["add_count"], deltas)
        await conn.execute(SQL["set_generation"], {"generation": self.state.generation + 1})
        await conn.execute("COMMIT")

    async def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                await self.conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal rollback failed: %s", exc)

    def _adopt(self, tx: Tx) -> None:
        """After a commit: this process's caches are the journal's state."""
        self.state.queues = tx.queues_by_id
        for (queue_id, status), delta in tx.count_deltas.items():
            self.state.counts.setdefault(queue_id, Counter())[status] += delta
        for queue_id in list(self.state.counts):
            if queue_id not in self.state.queues:
                del self.state.counts[queue_id]
        self.state.generation += 1

    def _fail(self, batch: list[Op], exc: BaseException) -> None:
        self.state.generation = -1  # the next transaction reloads everything
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
        for observe in self.commit_observers:
            observe(size, seconds)
