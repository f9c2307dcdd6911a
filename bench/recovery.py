"""Recovery: how long the broker takes to rebuild Redis from a journal of N pending messages, and in what memory.

The journal is built without HTTP: a short-lived broker creates the queue and publishes a few messages (so the
rows are the broker's own), then sqlite3 appends the rest by copying those rows - every column of `messages` and of
the `message.published` event in `events`, read from the file itself, so a schema change is followed - with new
ids, sequence numbers and contents, and the per-status counts are rebuilt with the journal's own `init_counts`.

Then, with an empty Redis:
  (a) startup: spawn `python -m app serve` on that journal and time it to /health/ready (the rebuild runs before
      the broker answers ready);
  (b) rebuild alone: FLUSHALL under the running broker and time until the queue's ready list holds all N ids
      again (this includes noticing the loss: the broker looks every BROKER_REDIS_CHECK_INTERVAL_SECONDS, 1 s);
      then `python -m app journal check` must exit 0.
The broker runs these with BROKER_LOG_LEVEL=info (no request load here) so its own rebuild time, logged at info,
can be reported beside the wall-clock figures.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from app.stores.keys import queue_keys
from app.stores.sql_blocks import load
from bench.servers import ROOT, BrokerServer, RedisServer

QUEUE = "bench-recovery"
SEED_MESSAGES = 3
CHUNK = 50_000
REBUILD_TIMEOUT = 900.0
RECONCILED = re.compile(r"reconciled Redis with the journal: .*?ready=(\d+).*?seconds=([0-9.]+)")


@dataclass
class RecoveryResult:
    messages: int
    build_seconds: float
    journal_bytes: int
    startup_empty_seconds: float  # spawn -> ready on a journal with one queue and a few messages
    startup_seconds: float  # spawn -> ready on the N-message journal, empty Redis (includes the rebuild)
    startup_rebuild_seconds: float | None  # the broker's own figure for that rebuild (its log)
    rebuild_seconds: float  # FLUSHALL -> ready list holds N ids again (includes detecting the loss)
    rebuild_internal_seconds: float | None  # the broker's own figure for that rebuild (its log)
    check_exit: int  # `python -m app journal check` after the rebuild: 0 = no differences
    check_seconds: float
    rss_empty: int  # broker RSS once ready on the small journal
    rss_after_startup: int  # broker RSS once ready on the N-message journal
    rss_peak_startup: int
    rss_before_rebuild: int
    rss_peak_rebuild: int
    redis_used_memory: int  # Redis's used_memory with the N ids in it

    @property
    def rebuild_rss_growth(self) -> int:
        return max(0, self.rss_peak_rebuild - self.rss_before_rebuild)


def build_journal(path: Path, queue: str, extra: int, progress: Callable[[str], None] = print) -> float:
    """Append `extra` pending messages to `queue` by copying its newest message and that message's published event.
    Returns the seconds it took."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        event_columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        [queue_id] = conn.execute("SELECT id FROM queues WHERE name = ?", (queue,)).fetchone()
        template = conn.execute(
            f"SELECT {', '.join(columns)} FROM messages WHERE queue_id = ? AND status = 'pending' "
            "ORDER BY id DESC LIMIT 1", (queue_id,)).fetchone()
        if template is None:
            raise RuntimeError(f"no pending message in {queue} to copy")
        event_template = conn.execute(
            f"SELECT {', '.join(event_columns)} FROM events WHERE message_id = ? AND type = 'message.published'",
            (template[columns.index("id")],)).fetchone()
        if event_template is None:
            raise RuntimeError("the template message has no message.published event")
        [(max_id, max_seq)] = conn.execute(
            "SELECT (SELECT max(id) FROM messages), (SELECT max(seq) FROM events)").fetchall()
        insert_message = (f"INSERT INTO messages ({', '.join(columns)}) "
                          f"VALUES ({', '.join('?' for _ in columns)})")
        insert_event = (f"INSERT INTO events ({', '.join(event_columns)}) "
                        f"VALUES ({', '.join('?' for _ in event_columns)})")
        at = {name: columns.index(name) for name in ("id", "content", "created_at", "updated_at", "available_at")}
        ev = {name: event_columns.index(name) for name in ("seq", "ts", "message_id")}

        def messages(first: int, count: int, now: float) -> Iterator[tuple[object, ...]]:
            row = list(template)
            for n in range(first, first + count):
                row[at["id"]] = max_id + 1 + n
                row[at["content"]] = orjson.dumps({"task": "recovery", "n": n}).decode()
                row[at["created_at"]] = row[at["updated_at"]] = row[at["available_at"]] = now
                yield tuple(row)

        def events(first: int, count: int, now: float) -> Iterator[tuple[object, ...]]:
            row = list(event_template)
            for n in range(first, first + count):
                row[ev["seq"]] = max_seq + 1 + n
                row[ev["message_id"]] = max_id + 1 + n
                row[ev["ts"]] = now
                yield tuple(row)

        done = 0
        while done < extra:
            count = min(CHUNK, extra - done)
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert_message, messages(done, count, now))
            conn.executemany(insert_event, events(done, count, now))
            conn.execute("COMMIT")
            done += count
            if done % (CHUNK * 4) == 0 or done == extra:
                progress(f"  journal: {done + SEED_MESSAGES:,} messages ({time.perf_counter() - started:.1f}s)")
        conn.executescript(f"BEGIN IMMEDIATE;\n{load('journal.sql')['init_counts']}\nCOMMIT;")
        conn.execute("INSERT INTO meta (key, value) VALUES ('generation', '1') "
                     "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def _llen(redis: RedisServer, queue: str) -> int:
    with contextlib.closing(redis.client()) as client:
        return int(client.llen(queue_keys(queue).ready))


def _wait_for_ready_list(redis: RedisServer, queue: str, n: int, timeout: float) -> None:
    key = queue_keys(queue).ready
    deadline = time.monotonic() + timeout
    with contextlib.closing(redis.client()) as client:
        while client.llen(key) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key} does not hold {n} ids after {timeout}s (it holds {client.llen(key)})")
            time.sleep(0.01)


def _logged_rebuilds(broker: BrokerServer) -> list[tuple[int, float]]:
    """(ready ids, seconds) of each rebuild the broker logged, oldest first."""
    found: list[tuple[int, float]] = []
    for path in sorted((broker.data_dir / "logs").glob("broker*.log")):
        for match in RECONCILED.finditer(path.read_text(errors="replace")):
            found.append((int(match.group(1)), float(match.group(2))))
    return found


def run_recovery(workdir: Path, redis: RedisServer, n: int, progress: Callable[[str], None] = print) -> RecoveryResult:
    data = workdir / "recovery"
    redis.flushall()
    seed = BrokerServer(data, redis.url, log_level="info")
    seed.start()
    try:
        startup_empty = seed.startup_seconds
        rss_empty = seed.rss.sample() if seed.rss else 0
        token = seed.login()
        seed.create_queue(token, QUEUE)
        for i in range(min(n, SEED_MESSAGES)):
            response = seed.request(token, "POST", f"/queues/{QUEUE}/messages",
                                    json={"content": {"task": "recovery", "n": -1 - i}})
            if response.status_code != 201:
                raise RuntimeError(f"seed publish: {response.status_code} {response.text}")
    finally:
        seed.stop()

    extra = max(0, n - SEED_MESSAGES)
    progress(f"  building a journal of {n:,} pending messages with sqlite3")
    journal = data / "journal.sqlite3"
    build_seconds = build_journal(journal, QUEUE, extra, progress) if extra else 0.0
    journal_bytes = sum(p.stat().st_size for p in data.glob("journal.sqlite3*"))

    redis.flushall()
    progress("  starting the broker on it with an empty Redis")
    broker = BrokerServer(data, redis.url, log_level="info")
    broker.start(timeout=REBUILD_TIMEOUT)
    try:
        assert broker.rss is not None
        if (held := _llen(redis, QUEUE)) != n:
            raise RuntimeError(f"after startup the ready list holds {held} ids, not {n}")
        startup_seconds = broker.startup_seconds
        rss_peak_startup = broker.rss.peak
        time.sleep(1.0)
        rss_after_startup = broker.rss.sample()
        broker.rss.reset_peak()
        rss_before = broker.rss.last

        progress("  FLUSHALL under the running broker; waiting for the rebuild")
        started = time.perf_counter()
        redis.flushall()
        _wait_for_ready_list(redis, QUEUE, n, REBUILD_TIMEOUT)
        rebuild_seconds = time.perf_counter() - started
        time.sleep(0.3)
        rss_peak_rebuild = broker.rss.peak
        redis_memory = redis.used_memory()

        started = time.perf_counter()
        check = subprocess.run([sys.executable, "-m", "app", "journal", "check"], env=broker.cli_env(), cwd=ROOT,
                               capture_output=True, text=True, timeout=REBUILD_TIMEOUT, check=False)
        check_seconds = time.perf_counter() - started
        if check.returncode != 0:
            progress(f"  journal check exited {check.returncode}: {(check.stdout + check.stderr)[-1000:]}")
    finally:
        broker.stop()
    logged = _logged_rebuilds(broker)
    big = [seconds for ready, seconds in logged if ready == n]
    return RecoveryResult(
        messages=n, build_seconds=build_seconds, journal_bytes=journal_bytes,
        startup_empty_seconds=startup_empty, startup_seconds=startup_seconds,
        startup_rebuild_seconds=big[0] if big else None, rebuild_seconds=rebuild_seconds,
        rebuild_internal_seconds=big[1] if len(big) > 1 else None,
        check_exit=check.returncode, check_seconds=check_seconds,
        rss_empty=rss_empty, rss_after_startup=rss_after_startup, rss_peak_startup=rss_peak_startup,
        rss_before_rebuild=rss_before, rss_peak_rebuild=rss_peak_rebuild, redis_used_memory=redis_memory,
    )

