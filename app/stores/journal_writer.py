"""The journal's one writer per process: group commit, and safe sharing of one journal by several processes.

Operations queue up while a transaction commits; the next transaction takes all of them (up to `batch_max`
operations and `batch_rows` rows), so one fsync covers many callers, and each caller is answered only once its
commit is on disk. What a transaction does is journal_connection.py's; when it runs, and who hears of it, is here.

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
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.errors import JournalUnavailable
from app.models import Event
from app.stores.journal_connection import FileLock, FlushFailed, JournalConnection, Op, Outcome, SharedState
from app.stores.journal_tx import Tx

log = logging.getLogger(__name__)
EventListener = Callable[[list[Event]], None]
T = TypeVar("T")
SUBMIT_TIMEOUT_SECONDS = 30.0
WATCH_SECONDS = 1.0  # how often the watchdog looks for a stuck commit
BATCH_ROWS = 5_000  # rows per transaction: bounds how long one commit holds the event loop
CHECKPOINT_EVERY_COMMITS = 200
GATHER_TURNS = 4  # at most this many extra turns of the event loop to gather a batch
STALL_SECONDS = 0.1  # one flush slower than this moves flushing off the loop (see _flush)
SLOW_AVERAGE_SECONDS = 0.005  # so do flushes averaging slower than this (one slow flush on a busy VM does not)
FLUSH_AVERAGE_WEIGHT = 0.02  # of the latest flush in the moving average (about the last 50 flushes)
FLUSHES_TO_RETURN = 1000  # on the thread before flushing on the loop again


@dataclass
class JournalStats:
    commits: int = 0
    operations: int = 0
    last_batch_size: int = 0
    last_commit_seconds: float = 0.0
    last_error: str | None = None
    checkpoints: int = 0


class JournalWriter:
    def __init__(self, path: Path, *, sync: str, batch_max: int, batch_rows: int = BATCH_ROWS) -> None:
        self.path = path
        self.sync = sync
        self.batch_max = batch_max
        self.batch_rows = batch_rows
        self.stats = JournalStats()
        self.healthy = True
        self.listeners: list[EventListener] = []
        self.commit_observers: list[Callable[[int, float], None]] = []  # (operations, seconds) per commit
        self.late_commit_listeners: list[Callable[[], None]] = []  # a commit whose callers were answered before it
        self._lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        # Flushes off the loop (a slow disk) have a thread of their own: on the writer's they would queue behind a
        # checkpoint, and every commit would wait for it. (fdatasync of the WAL beside a checkpoint is safe.)
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-flush")
        self.db = JournalConnection(path, sync=sync, lock_fd=self._lock_fd)
        self._conn_lock = asyncio.Lock()  # one user of the writing connection at a time: a commit or a `run`
        self._inbox: deque[Op | None] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._batch: list[Op] = []  # the operations of the commit in progress
        self._commit_started: float | None = None  # monotonic time the commit in progress started
        self._commits_since_checkpoint = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self._slow_disk = False  # flush on the flush thread (see _flush)
        self._flush_average = 0.0  # seconds, a moving average
        self._thread_flushes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Open the connection, create the schema and load the caches (on the writer thread)."""
        await self.run(self.db.open)
        self._tasks = [asyncio.create_task(self._loop(), name="journal-writer"),
                       asyncio.create_task(self._watch(), name="journal-watchdog")]

    async def stop(self) -> None:
        self._stopping = True
        if self._tasks:
            self._put(None)  # the loop drains what was queued before this, then stops
            await asyncio.wait([self._tasks[0]])  # (one stopped by a bug has logged it: close all the same)
            self._tasks[1].cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        await self.run(self.db.close)
        self._thread.shutdown(wait=True)
        self._flusher.shutdown(wait=True)
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
        """Run `fn(*args)` on the writer thread with the writing connection, between commits. The connection stays
        the thread's until `fn` returns, even if the caller is cancelled meanwhile."""
        await self._conn_lock.acquire()
        try:
            running = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except BaseException:
            self._conn_lock.release()
            raise
        running.add_done_callback(lambda _: self._conn_lock.release())
        return await asyncio.shield(running)

    @property
    def state(self) -> SharedState:
        return self.db.state

    # -- the connection -----------------------------------------------------------------------------------------

    # -- on the event loop ----------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            await self._commit_batches()
        except Exception:
            self.healthy = False
            log.exception("the journal writer stopped on an unexpected error; nothing more is written")
            raise
        finally:  # after a stop nothing should be left; after a bug, nobody must wait for an answer forever
            for op in self._inbox:
                if op is not None and not op.future.done():
                    op.future.set_exception(JournalUnavailable("The journal is not accepting writes"))

    async def _commit_batches(self) -> None:
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
            try:
                await self._commit(batch)
            except BaseException as exc:  # a bug, or the task cancelled: this batch's callers must hear of it
                self._fail(batch, exc, JournalUnavailable(
                    "The journal writer stopped; the outcome is unknown, retry (with an Idempotency-Key for "
                    "publishes)", retry_after=5))
                raise

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
        if self.db.flush_failed is not None:
            self._fail(batch, self.db.flush_failed, JournalUnavailable(
                f"A flush of the journal to disk failed ({self.db.flush_failed}); nothing is written until the "
                "broker is restarted", retry_after=5))
            return
        started = time.perf_counter()
        self._batch, self._commit_started = batch, time.monotonic()
        try:
            async with self._conn_lock:
                if batch[0].alone:
                    tx, outcomes = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._locked_transaction, batch)
                else:
                    tx, outcomes = await self._transaction_on_loop(batch)
        except FlushFailed as exc:  # committed, but perhaps not on disk
            self._fail(batch, exc, JournalUnavailable(
                f"The journal could not be flushed to disk ({exc}); the outcome is unknown, and nothing more is "
                "written until the broker is restarted", retry_after=5))
            return
        except Exception as exc:  # disk full, I/O error, locked, closed: fail closed, never half-answer
            self._fail(batch, exc, JournalUnavailable(
                f"The journal cannot commit right now ({exc.__class__.__name__}); retry later"))
            return
        finally:
            self._batch, self._commit_started = [], None
        self.healthy = True
        self._record(len(batch), time.perf_counter() - started)
        if any(op.future.done() and not op.future.cancelled() for op in batch):
            # The watchdog answered some of these "outcome unknown", so their callers did not follow up (a publish
            # did not push its ids to Redis): let the owners of what follows a commit catch up.
            for late in self.late_commit_listeners:
                try:
                    late()
                except Exception:  # as with every listener: never undo or block a commit
                    log.exception("journal late-commit listener failed")
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

    def _locked_transaction(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        """For the writer's thread: a transaction of its own (a queue or user change), under the file lock."""
        with FileLock(self._lock_fd):
            done = self.db.transaction(batch)
        self.db.flush()
        return done

    async def _transaction_on_loop(self, batch: list[Op]) -> tuple[Tx, list[Outcome]]:
        loop = asyncio.get_running_loop()
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is committing: wait for it on the thread, not on the loop
            await loop.run_in_executor(self._thread, fcntl.flock, self._lock_fd, fcntl.LOCK_EX)
        try:
            done = self.db.transaction(batch)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        await self._flush()
        return done

    async def _flush(self) -> None:
        """Flush the WAL on the event loop while the disk answers fast (handing it to a thread and back cost
        20-40% of the throughput here, against a 0.1-0.6 ms flush); on a thread once the disk stalls (one
        flush over STALL_SECONDS) or is slow (flushes averaging over SLOW_AVERAGE_SECONDS), so that such a disk
        holds up the commits but not every other request, and the watchdog can answer for a stuck one. Back on
        the loop after FLUSHES_TO_RETURN flushes on the thread, once they average fast again."""
        if self._slow_disk:
            seconds = await asyncio.get_running_loop().run_in_executor(self._flusher, self.db.flush)
            self._thread_flushes += 1
        else:
            seconds = self.db.flush()
        self._flush_average += (seconds - self._flush_average) * FLUSH_AVERAGE_WEIGHT
        if not self._slow_disk and (seconds > STALL_SECONDS or self._flush_average > SLOW_AVERAGE_SECONDS):
            self._slow_disk, self._thread_flushes = True, 0
            log.warning("the journal's disk is slow (a flush took %.0f ms, %.1f ms on average): flushing on the "
                        "journal's flush thread from now on", seconds * 1000, self._flush_average * 1000)
        elif (self._slow_disk and self._thread_flushes >= FLUSHES_TO_RETURN
              and self._flush_average < SLOW_AVERAGE_SECONDS / 4):
            self._slow_disk = False
            log.info("the journal's disk flushes fast again: flushing on the event loop")

    def _start_checkpoint(self) -> None:
        self._commits_since_checkpoint = 0
        checkpoint = asyncio.get_running_loop().run_in_executor(self._thread, self.db.checkpoint)
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

    def _fail(self, batch: list[Op], exc: BaseException, error: JournalUnavailable) -> None:
        self.healthy = False
        self.stats.last_error = f"{exc.__class__.__name__}: {exc}"
        log.error("journal commit failed, %d operations answered 503: %s", len(batch), exc)
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
