"""The journal's one writer per process: group commit, and safe sharing of one journal by several processes.

Operations queue up while a transaction commits; the next transaction takes all of them (up to `batch_max`
operations and `batch_rows` rows), so one fsync covers many callers, and each caller is answered only after the
commit.

Message transactions run on the event loop itself, in one go (lock, BEGIN, reads, the operations, writes, COMMIT):
the event loop's thread holds the GIL almost all the time under load, and a second thread that needs it back after
every SQLite call waits up to the interpreter's switch interval (5 ms) each time, which made a 0.3 ms commit take
4-7 ms. A commit holds the loop for its own CPU time and one fdatasync (~0.1 ms here), and requests arriving
meanwhile join the next batch. Queue and user changes (a purge may delete a million rows) run on the writer's
thread, and so do checkpoints of the WAL, so neither stalls the loop.

Several broker processes may share a journal: each transaction holds an exclusive `flock` on a lock file (taken
without blocking when it is free; otherwise the writer's thread waits for it, woken by the kernel the moment it is
released, while the loop goes on), reads the next ids (and any queue counts it needs) inside the transaction,
and bumps a generation when it changes a queue; a process that finds the generation moved reloads its queues first.
The lock covers the writing only: the WAL is flushed to disk (fdatasync, with sync=full) once it is released, so
one process's flush never holds up another's commit, and callers are answered after the flush.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from app.errors import BrokerError, JournalUnavailable
from app.models import Event, Queue, is_valid_id
from app.stores.journal_tx import Counters, Row, Tx, event_params, queue_from_row, row_from_tuple
from app.stores.sql_blocks import load

log = logging.getLogger(__name__)
SQL = load("journal.sql")
EventListener = Callable[[list[Event]], None]
T = TypeVar("T")
Outcome = tuple["Op", Any, BaseException | None]
SUBMIT_TIMEOUT_SECONDS = 30.0
WATCH_SECONDS = 1.0  # how often the watchdog looks for a stuck commit
BATCH_ROWS = 5_000  # rows per transaction: bounds how long one commit holds the event loop
CHECKPOINT_EVERY_COMMITS = 200
GATHER_TURNS = 4  # at most this many extra turns of the event loop to gather a batch


@dataclass
class Op:
    apply: Callable[[Tx], Any]  # runs inside the transaction
    future: asyncio.Future[Any]
    ids: tuple[int, ...] = ()
    alone: bool = False  # queue and user changes commit in a transaction of their own, on the writer's thread
    idempotency_keys: tuple[str, ...] = ()
    rows: int = 1  # messages it may write, for the batch's bound
    counts_for: tuple[int, ...] = ()  # queues whose committed counts it reads (Tx.counts)


@dataclass
class JournalStats:
    commits: int = 0
    operations: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    last_error: str | None = None
    checkpoints: int = 0


@dataclass
class SharedState:
    """What this process caches of the journal: the queues, valid while their generation has not moved."""

    queues: dict[int, Queue] = field(default_factory=dict)
    counters: Counters = field(default_factory=lambda: Counters(0, 0, 0))
    generation: int = -1


class JournalWriter:
    def __init__(self, path: Path, *, sync: str, batch_max: int, batch_rows: int = BATCH_ROWS) -> None:
        self.path = path
        self.sync = sync
        self.batch_max = batch_max
        self.batch_rows = batch_rows
        self.stats = JournalStats()
        self.state = SharedState()
        self.healthy = True
        self.listeners: list[EventListener] = []
        self.commit_observers: list[Callable[[int, float], None]] = []  # (operations, seconds) per commit
        self._lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None  # the thread's own connection, for WAL checkpoints
        self._conn_lock = asyncio.Lock()  # one user of the writing connection at a time: a commit or a `run`
        self._inbox: deque[Op | None] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._batch: list[Op] = []  # the operations of the commit in progress
        self._commit_started: float | None = None  # monotonic time the commit in progress started
        self._commits_since_checkpoint = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self._wal_fd: int | None = None
        self._flush_failed: OSError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Open the connection, create the schema and load the caches (on the writer thread)."""
        await self.run(self._open)
        self._tasks = [asyncio.create_task(self._loop(), name="journal-writer"),
                       asyncio.create_task(self._watch(), name="journal-watchdog")]

    async def stop(self) -> None:
        self._stopping = True
        if self._tasks:
            self._put(None)  # the loop drains what was queued before this, then stops
            await self._tasks[0]
            self._tasks[1].cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        await self.run(self._close)
        self._thread.shutdown(wait=True)
        os.close(self._lock_fd)

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not self._tasks[0].done() and not self._stopping

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue `op` for the next transaction; its future resolves once that transaction has committed. Once
        queued, an operation is applied even if nobody awaits its future any more."""
        if not self.running:
            raise JournalUnavailable("The journal is not accepting writes")
        self._put(op)
        return op.future

    def _put(self, op: Op | None) -> None:
        self._inbox.append(op)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread with the writing connection, between commits."""
        async with self._conn_lock:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def reload(self) -> None:
        """For `run`: pick up what other processes changed (no-op if nothing did)."""
        self._sync()

    def execute(self, sql: str) -> list[Any]:
        """For `run`: one statement outside the batch loop, e.g. a PRAGMA."""
        assert self._conn is not None
        return self._conn.execute(sql).fetchall()

    # -- the connection -----------------------------------------------------------------------------------------

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")  # first: another process may be creating the same journal
        self._conn = conn
        with self._locked():  # worker processes start together: one at a time sets WAL and creates the schema
            # COMMIT writes the WAL without an fsync; with sync=full, _flush_wal makes it durable after the file
            # lock is released, so another process's commit need not wait for this one's disk flush.
            for pragma in ("journal_mode = WAL", "synchronous = NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            conn.executescript(SQL["schema"])
            if not conn.execute(SQL["counts_ready"]).fetchall():
                conn.executescript(f"BEGIN IMMEDIATE;\n{SQL['init_counts']}\nCOMMIT;")
            self._sync()
        # Commits never checkpoint (that would copy the WAL into the database on the event loop, several ms at
        # times): the writer's thread does it on its own connection, beside the commits.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._wal_fd = os.open(self.path.with_name(self.path.name + "-wal"), os.O_RDONLY)
        _sync_directory(self.path.parent)  # the WAL's directory entry, once
        self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._checkpointer.execute("PRAGMA busy_timeout = 10000")

    def _close(self) -> None:
        for conn in (self._checkpointer, self._conn):
            if conn is not None:
                conn.close()  # the last connection to close checkpoints the WAL
        self._conn = self._checkpointer = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _flush_wal(self) -> None:
        """With sync=full, make every commit written so far durable (the WAL's data; its size when it grew). A
        failed flush leaves it unknown which writes reached the disk, and the kernel may not report the loss again:
        from then on the writer refuses every commit until the broker is restarted."""
        if self.sync != "full" or self._wal_fd is None:
            return
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            log.critical("fsync of the journal's WAL failed (%s): refusing writes until the broker is restarted", exc)
            self._flush_failed = exc
            raise

    def _locked(self) -> _FileLock:
        return _FileLock(self._lock_fd)

    def _sync(self) -> None:
        """Read the next ids and, if another process changed the queues since, reload them."""
        assert self._conn is not None
        [(message_id, seq, queue_id, generation)] = self._conn.execute(SQL["write_state"]).fetchall()
        self.state.counters = Counters(message_id, seq, queue_id)
        if generation != self.state.generation:
            queue_rows = self._conn.execute(SQL["select_queues"]).fetchall()
            self.state.queues = {q.id: q for q in (queue_from_row(tuple(r)) for r in queue_rows)}
            self.state.generation = generation

    def _locked_transaction(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        with self._locked():
            done = self._transaction(batch)
        self._flush_wal()
        return done

    def _transaction(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        """One group-committed transaction (the caller holds the file lock); raises, after rolling back, if it
        cannot commit."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._sync()
            tx = Tx(
                rows=self._load_rows({i for op in batch for i in op.ids}),
                counters=self.state.counters,
                # Only queue changes alter this, and they run alone: other batches may share the cached one.
                queues_by_id=dict(self.state.queues) if batch[0].alone else self.state.queues,
                counts=self._load_counts({q for op in batch for q in op.counts_for}),
                idempotency=self._load_idempotency({k for op in batch for k in op.idempotency_keys}),
            )
            outcomes = [_apply(op, tx) for op in batch]
            self._write(tx)
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            self.state.generation = -1  # reload everything next time
            raise
        try:
            self._adopt(tx)
        except Exception:  # committed all the same: answer the callers, reload the caches next time
            log.exception("journal caches not updated after a commit; reloading them")
            self.state.generation = -1
        return tx, outcomes

    def _load_rows(self, ids: set[int]) -> dict[int, Row]:
        ids = {i for i in ids if is_valid_id(i)}
        if not ids:
            return {}
        assert self._conn is not None
        found = self._conn.execute(SQL["select_messages_by_ids"], {"ids": orjson.dumps(list(ids)).decode()})
        return {r[0]: row_from_tuple(r) for r in found.fetchall()}

    def _load_counts(self, queue_ids: set[int]) -> dict[int, Counter[str]]:
        if not queue_ids:
            return {}
        assert self._conn is not None
        counts: dict[int, Counter[str]] = {queue_id: Counter() for queue_id in queue_ids}
        found = self._conn.execute(SQL["select_counts_of_queues"], {"ids": orjson.dumps(list(queue_ids)).decode()})
        for queue_id, status, n in found.fetchall():
            counts[queue_id][status] = n
        return counts

    def _load_idempotency(self, keys: set[str]) -> dict[str, tuple[int, float, str | None]]:
        if not keys:
            return {}
        assert self._conn is not None
        found = self._conn.execute(SQL["select_idempotency_keys"], {"keys": orjson.dumps(list(keys)).decode()})
        return {r[0]: (r[1], r[2], r[3]) for r in found.fetchall()}

    def _write(self, tx: Tx) -> None:
        conn = self._conn
        assert conn is not None
        if tx.inserted:
            conn.executemany(SQL["insert_message"], tx.inserted)
        if tx.dirty:
            conn.executemany(SQL["update_message"], list(tx.dirty.values()))
        if tx.deleted:
            conn.executemany(SQL["delete_message"], [{"id": i} for i in tx.deleted])
        for sql, params in tx.statements:
            conn.execute(sql, params)
        if tx.events:
            conn.executemany(SQL["insert_event"], [event_params(e) for e in tx.events])
        deltas = [{"queue_id": q, "status": s, "delta": d} for (q, s), d in tx.count_deltas.items()
                  if d and q in tx.queues_by_id]
        if deltas:
            conn.executemany(SQL["add_count"], deltas)
        if tx.queues_changed:
            conn.execute(SQL["set_generation"], {"generation": self.state.generation + 1})
        if tx.inserted or tx.deleted or tx.statements:  # ids were handed out or rows removed: keep the marks
            conn.execute(SQL["set_high_water"],
                         {"message_id": tx.counters.message_id, "queue_id": tx.counters.queue_id})

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal rollback failed: %s", exc)

    def _adopt(self, tx: Tx) -> None:
        """After a commit: this process's cached queues are the journal's."""
        if tx.queues_changed:
            self.state.queues = tx.queues_by_id
            self.state.generation += 1

    def _checkpoint_wal(self) -> None:
        """On the writer thread: copy committed WAL frames into the database, never waiting for readers."""
        if self._checkpointer is not None:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- on the event loop ----------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            while not self._inbox:
                self._wakeup = loop.create_future()
                await self._wakeup
                await asyncio.sleep(0)  # let the callers woken in the same loop iteration queue theirs too
                await self._gather()
            first = self._inbox.popleft()
            if first is None:
                break
            batch, rows = [first], first.rows
            while not first.alone and self._inbox and len(batch) < self.batch_max and rows < self.batch_rows:
                op = self._inbox[0]
                if op is None:
                    stopping = True
                    break
                if op.alone:
                    break  # commits next, in a transaction of its own
                self._inbox.popleft()
                batch.append(op)
                rows += op.rows
            await self._commit(batch)
        for op in self._inbox:  # a stop only follows what was queued before it; nothing should be here
            if op is not None and not op.future.done():
                op.future.set_exception(JournalUnavailable("The journal is not accepting writes"))

    async def _gather(self) -> None:
        """While each turn of the event loop brings more operations (requests arriving under load), give it a few
        more turns before committing: one commit for more callers, fewer fsyncs and fewer rewrites of the same
        pages (16 consumers committed ~10 operations at a time, and commits took half the loop's time). A lone
        caller waits one turn more, not longer."""
        for _ in range(GATHER_TURNS):
            queued = len(self._inbox)
            await asyncio.sleep(0)
            if len(self._inbox) == queued:
                return

    async def _commit(self, batch: list[Op]) -> None:
        started = time.perf_counter()
        self._batch, self._commit_started = batch, time.monotonic()
        try:
            if self._flush_failed is not None:
                raise JournalUnavailable("A flush of the journal to disk failed; nothing is written until the broker "
                                         f"is restarted ({self._flush_failed})")
            async with self._conn_lock:
                if batch[0].alone:
                    tx, outcomes = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._locked_transaction, batch)
                else:
                    tx, outcomes = await self._transaction_on_loop(batch)
        except Exception as exc:  # disk full, I/O error, locked, closed: fail closed, never half-answer
            self._fail(batch, exc)
            return
        finally:
            self._batch, self._commit_started = [], None
        self.healthy = True
        self._record(len(batch), time.perf_counter() - started)
        for op, result, error in outcomes:
            if op.future.done():  # the caller went away, or the watchdog answered it; committed regardless
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
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS and self._checkpoint is None:
            self._start_checkpoint()

    async def _transaction_on_loop(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is committing: wait for it on the thread, not on the loop
            await asyncio.get_running_loop().run_in_executor(self._thread, fcntl.flock, self._lock_fd, fcntl.LOCK_EX)
        try:
            done = self._transaction(batch)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._flush_wal()
        return done

    def _start_checkpoint(self) -> None:
        self._commits_since_checkpoint = 0
        checkpoint = asyncio.get_running_loop().run_in_executor(self._thread, self._checkpoint_wal)
        self._checkpoint = checkpoint

        def done(future: asyncio.Future[None]) -> None:
            self._checkpoint = None
            if future.cancelled():
                return
            if future.exception() is not None:
                log.warning("journal checkpoint failed (retried later): %s", future.exception())
            else:
                self.stats.checkpoints += 1

        checkpoint.add_done_callback(done)

    async def _watch(self) -> None:
        """Answer callers of a commit stuck for SUBMIT_TIMEOUT_SECONDS (a stalled disk, a stopped process holding
        the lock) instead of letting them hang: that commit's outcome is unknown; what waits behind it is refused."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            started = self._commit_started
            if started is None or time.monotonic() - started < SUBMIT_TIMEOUT_SECONDS:
                continue
            self.healthy = False
            unknown = JournalUnavailable(
                f"The journal did not commit within {SUBMIT_TIMEOUT_SECONDS:g}s; the outcome is unknown, retry "
                "(with an Idempotency-Key for publishes)", retry_after=5
            )
            for op in self._batch:
                if not op.future.done():
                    op.future.set_exception(unknown)
            refused = JournalUnavailable(f"The journal has not committed for {SUBMIT_TIMEOUT_SECONDS:g}s; nothing "
                                         "was written, retry later", retry_after=5)
            queued = [op for op in self._inbox if op is not None]
            self._inbox = deque(op for op in self._inbox if op is None)
            for op in queued:
                if not op.future.done():
                    op.future.set_exception(refused)

    def _fail(self, batch: list[Op], exc: BaseException) -> None:
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
            try:
                observe(size, seconds)
            except Exception:  # an observer (metrics) must never stop the writer
                log.exception("journal commit observer failed")


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(op: Op, tx: Tx) -> Outcome:
    try:
        return op, op.apply(tx), None
    except BrokerError as exc:  # refused before it changed anything; the rest of the batch goes on
        return op, None, exc


class _FileLock:
    """Exclusive flock held for one transaction (blocking is fine: this runs on the writer thread)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
