"""The journal writer's SQLite connection: the schema, one group-committed transaction at a time, flushing the WAL to
disk, and checkpoints on a connection of their own.

Every write of the journal is an operation applied to a `Tx` (journal_tx.py) inside one transaction here; the
writer (journal_writer.py) decides when transactions run, on which thread, and who hears of them. The connection
runs with `synchronous=NORMAL`: COMMIT writes the WAL without an fsync, and with sync=full `flush` makes it durable
once the writer has released the file lock, so that another process's commit need not wait for this one's disk.
Commits never checkpoint either (that would copy the WAL into the database inside a commit, several ms at times):
`checkpoint` does it, on the writer's thread and its own connection, beside the commits.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from app.errors import BrokerError
from app.models import Queue, is_valid_id
from app.stores.journal_tx import Counters, Row, Tx, event_params, queue_from_row, row_from_tuple
from app.stores.sql_blocks import Positional, load

log = logging.getLogger(__name__)
SQL = load("journal.sql")
# The statements run once per message of a batch, bound by position (see Positional).
INSERT_MESSAGE, UPDATE_MESSAGE, INSERT_EVENT = (Positional.of(SQL[name]) for name in
                                                ("insert_message", "update_message", "insert_event"))
Outcome = tuple["Op", Any, BaseException | None]


@dataclass
class Op:
    """One caller's write, queued for the writer's next transaction."""

    apply: Callable[[Tx], Any]  # runs inside the transaction
    future: asyncio.Future[Any]
    ids: tuple[int, ...] = ()
    alone: bool = False  # queue and user changes commit in a transaction of their own, on the writer's thread
    idempotency_keys: tuple[str, ...] = ()
    rows: int = 1  # messages it may write, for the batch's bound
    counts_for: tuple[int, ...] = ()  # queues whose committed counts it reads (Tx.counts)


@dataclass
class SharedState:
    """What this process caches of the journal: the queues, valid while their generation has not moved."""

    queues: dict[int, Queue] = field(default_factory=dict)
    counters: Counters = field(default_factory=lambda: Counters(0, 0, 0))
    generation: int = -1


class JournalConnection:
    def __init__(self, path: Path, *, sync: str, lock_fd: int) -> None:
        """`lock_fd`: the writers' lock file (`open` takes it while it sets the journal up)."""
        self.path = path
        self.sync_mode = sync
        self.state = SharedState()
        self.flush_failed: OSError | None = None
        self._lock_fd = lock_fd
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._wal_fd: int | None = None

    def execute(self, sql: str) -> list[Any]:
        """One statement outside any batch, e.g. a PRAGMA."""
        assert self._conn is not None
        return self._conn.execute(sql).fetchall()

    def open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")  # first: another process may be creating the same journal
        self._conn = conn
        with FileLock(self._lock_fd):  # worker processes start together: one at a time sets WAL and creates the schema
            for pragma in ("journal_mode = WAL", "synchronous = NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            conn.executescript(SQL["schema"])
            if not conn.execute(SQL["counts_ready"]).fetchall():
                conn.executescript(f"BEGIN IMMEDIATE;\n{SQL['init_counts']}\nCOMMIT;")
            self.sync()
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._wal_fd = os.open(self.path.with_name(self.path.name + "-wal"), os.O_RDONLY)
        _sync_directory(self.path.parent)  # the WAL's directory entry, once
        self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._checkpointer.execute("PRAGMA busy_timeout = 10000")

    def close(self) -> None:
        for conn in (self._checkpointer, self._conn):
            if conn is not None:
                conn.close()  # the last connection to close checkpoints the WAL
        self._conn = self._checkpointer = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def flush(self) -> float:
        """With sync=full, make every commit written so far durable (the WAL's data; its size when it grew), and
        return how long it took. A failed flush leaves it unknown which writes reached the disk, and the kernel
        may not report the loss again: from then on the writer refuses every commit until the broker is restarted.

        A reader may see a commit in the moment between its COMMIT and this flush (another process's, or this
        one's while a slow disk has the flush on the journal's flush thread): a power cut then can take back what it
        read (a message a browse listed, say). Callers and listeners hear of a commit only after the flush."""
        if self.sync_mode != "full" or self._wal_fd is None:
            return 0.0
        started = time.perf_counter()
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            log.critical("fsync of the journal's WAL failed (%s): refusing writes until the broker is restarted", exc)
            self.flush_failed = exc
            raise FlushFailed(str(exc)) from exc
        return time.perf_counter() - started

    def sync(self) -> None:
        """Read the next ids and, if another process changed the queues since, reload them."""
        assert self._conn is not None
        [(message_id, seq, queue_id, generation)] = self._conn.execute(SQL["write_state"]).fetchall()
        self.state.counters = Counters(message_id, seq, queue_id)
        if generation != self.state.generation:
            queue_rows = self._conn.execute(SQL["select_queues"]).fetchall()
            self.state.queues = {q.id: q for q in (queue_from_row(tuple(r)) for r in queue_rows)}
            self.state.generation = generation

    def transaction(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        """One group-committed transaction (the caller holds the file lock, and flushes afterwards); raises, after
        rolling back, if it cannot commit."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.sync()
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
            conn.executemany(INSERT_MESSAGE.sql, map(INSERT_MESSAGE.pick, tx.inserted))
        if tx.dirty:
            conn.executemany(UPDATE_MESSAGE.sql, map(UPDATE_MESSAGE.pick, tx.dirty.values()))
        if tx.deleted:
            conn.executemany(SQL["delete_message"], [{"id": i} for i in tx.deleted])
        for sql, params in tx.statements:
            conn.execute(sql, params)
        if tx.events:
            conn.executemany(INSERT_EVENT.sql, [INSERT_EVENT.pick(event_params(e)) for e in tx.events])
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

    def checkpoint(self) -> None:
        """For the writer's thread: copy committed WAL frames into the database, never waiting for readers."""
        if self._checkpointer is not None:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _apply(op: Op, tx: Tx) -> Outcome:
    try:
        return op, op.apply(tx), None
    except BrokerError as exc:  # refused before it changed anything; the rest of the batch goes on
        return op, None, exc


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FlushFailed(OSError):
    """The WAL could not be flushed to disk after a commit: the commit's outcome is unknown."""


class FileLock:
    """Exclusive flock held for one transaction (blocking is fine: this runs on the writer thread)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
