"""Reconciliation of Redis with the journal (DESIGN.md, invariant 7), and detection of a lost Redis.

The journal is the truth. A rebuild refills each queue's Redis structures from it: pending ids to ready,
processing ids to processing with their journaled lease deadline (the reaper redelivers them once it passes).
Keys of queues the journal does not know are dropped. Rebuilding is idempotent and runs under the exclusive gate,
so no publish, delivery or ack interleaves with the swap.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.errors import RedisUnavailable
from app.gate import Gate
from app.models import MessageStatus, Queue
from app.stores.redis_queue import RedisQueueStore
from app.stores.sqlite_journal import SqliteJournalStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    queues: int
    ready: int
    processing: int
    dropped_queues: int
    seconds: float


class Reconciler:
    def __init__(self, journal: SqliteJournalStore, redis: RedisQueueStore, gate: Gate) -> None:
        self.journal = journal
        self.redis = redis
        self.gate = gate
        self.redis_up = False
        self.reconciles = 0
        self.eviction_policy = ""
        self._epoch: str | None = None  # "<redis run_id>:<token>" of the last rebuild this process saw
        self._dirty = True

    def mark_dirty(self) -> None:
        """A Redis change after a journal commit failed: Redis is down or behind; until the watcher has rebuilt
        it, publish and consume answer 503 instead of trying."""
        self._dirty = True
        self.redis_up = False

    def require_redis(self) -> None:
        if not self.redis_up:
            raise RedisUnavailable("Redis is unavailable; retry later")

    async def reconcile(self, *, force: bool = True) -> ReconcileReport | None:
        """Rebuild Redis from the journal. With several broker processes on one Redis, one rebuilds at a time;
        without `force`, a process that finds another has just rebuilt this Redis adopts that instead."""
        async with self.redis.reconcile_lock():
            run_id = await self.redis.run_id()
            epoch = await self.redis.get_epoch()
            if not force and not self._dirty and epoch is not None and epoch.startswith(run_id + ":"):
                self._adopt(epoch)
                return None
            async with self.gate.exclusive():
                report = await self._rebuild(run_id)
        log.info("reconciled Redis with the journal: %s", report)
        return report

    async def _rebuild(self, run_id: str) -> ReconcileReport:
        started = time.perf_counter()
        since = await self.journal.last_seq()
        ready = processing = 0
        queues = self.journal.queues()
        for queue in queues:
            counts = await self.journal.counts(queue)
            ready += counts[MessageStatus.PENDING.value]
            processing += counts[MessageStatus.PROCESSING.value]
            await self.redis.rebuild(queue.name, self._pending(queue), self._leased(queue), self._delayed(queue))
        known = {q.name for q in queues}
        leftovers = await self.redis.queue_names() - known
        for name in leftovers:
            await self.redis.drop_queue(name)
        # Other broker processes kept writing while this one rebuilt; a push of theirs that landed before the
        # swap was replaced by it. Put back every message the journal changed since the rebuild began.
        await self.catch_up(since)
        await self.check_eviction_policy()
        epoch = f"{run_id}:{uuid.uuid4().hex}"
        await self.redis.set_epoch(epoch)
        self._adopt(epoch)
        self._dirty = False
        self.reconciles += 1
        return ReconcileReport(len(queues), ready, processing, len(leftovers), time.perf_counter() - started)

    async def catch_up(self, since: int) -> None:
        """Put back in Redis every message the journal changed after `since` (add only: duplicates are harmless)."""
        while True:
            events = await self.journal.events_after(since, limit=5000)
            if not events:
                return
            since = events[-1].seq
            ids = sorted({e.message_id for e in events if e.message_id is not None})
            by_queue: dict[str, tuple[list[int], dict[int, float], dict[int, float]]] = {}
            for message in await self.journal.get_messages(ids):
                pending, delayed, leased = by_queue.setdefault(message.queue, ([], {}, {}))
                if message.status is MessageStatus.PENDING:
                    pending.append(message.id)
                elif message.status is MessageStatus.DELAYED:
                    delayed[message.id] = message.available_at
                elif message.status is MessageStatus.PROCESSING:
                    leased[message.id] = message.lease_expires_at or time.time()
            for queue, (pending, delayed, leased) in by_queue.items():
                await self.redis.restore(queue, pending, delayed, leased)

    def _adopt(self, epoch: str) -> None:
        self._epoch = epoch
        self.redis_up = True

    async def check_eviction_policy(self) -> None:
        """Redis must never evict the broker's keys: anything but noeviction is reported loudly."""
        policy = await self.redis.eviction_policy()
        self.eviction_policy = policy
        if policy not in ("noeviction", ""):
            log.error("Redis maxmemory-policy is %r: it may silently drop queue keys; set it to noeviction", policy)

    async def _pending(self, queue: Queue) -> AsyncIterator[list[int]]:
        async for chunk in self.journal.ids_by_status(queue, MessageStatus.PENDING):
            yield [message_id for message_id, _, _ in chunk]

    async def _leased(self, queue: Queue) -> AsyncIterator[list[tuple[int, float]]]:
        now = time.time()
        async for chunk in self.journal.ids_by_status(queue, MessageStatus.PROCESSING):
            yield [(message_id, lease or now) for message_id, lease, _ in chunk]

    async def _delayed(self, queue: Queue) -> AsyncIterator[list[tuple[int, float]]]:
        async for chunk in self.journal.ids_by_status(queue, MessageStatus.DELAYED):
            yield [(message_id, available_at) for message_id, _, available_at in chunk]

    async def watch_once(self) -> bool:
        """One look at Redis: rebuild it if it was lost (no epoch of this Redis incarnation: emptied, restarted,
        restored from a snapshot) or a change after a commit failed. Returns whether a rebuild ran."""
        if not await self.redis.ping():
            if self.redis_up:
                log.error("Redis stopped answering; consume and publish answer 503 until it is back")
            self.redis_up = False
            return False
        try:
            epoch, run_id = await self.redis.get_epoch(), await self.redis.run_id()
            current = epoch is not None and epoch.startswith(run_id + ":")
            if current and not self._dirty:
                if epoch != self._epoch:  # another broker process rebuilt it
                    self._adopt(epoch)  # type: ignore[arg-type]
                self.redis_up = True
                return False
            log.warning("Redis was lost or is behind the journal; rebuilding it")
            return await self.reconcile(force=self._dirty) is not None
        except (RedisUnavailable, OSError) as exc:
            log.error("Redis check failed: %s", exc)
            self.redis_up = False
            return False

    async def differences(self) -> list[str]:
        """What Redis holds that disagrees with the journal (`broker journal check`); empty when healthy."""
        found: list[str] = []
        queues = self.journal.queues()
        for queue in queues:
            snap = await self.redis.snapshot(queue.name)
            pending: set[int] = set()
            async for chunk in self._pending(queue):
                pending.update(chunk)
            leased: dict[int, float] = {}
            async for pairs in self._leased(queue):
                leased.update(pairs)
            delayed: dict[int, float] = {}
            async for pairs in self._delayed(queue):
                delayed.update(pairs)
            ready = Counter(snap.ready)
            in_processing = Counter(snap.processing)
            for label, ids in (
                ("pending in the journal but not ready in Redis", pending - ready.keys()),
                ("ready in Redis but not pending in the journal", ready.keys() - pending),
                ("ready in Redis more than once", {i for i, n in ready.items() if n > 1}),
                ("processing in the journal but not in Redis", leased.keys() - in_processing.keys()),
                ("processing in Redis but not in the journal", in_processing.keys() - leased.keys()),
                ("processing in Redis more than once", {i for i, n in in_processing.items() if n > 1}),
                ("processing without a lease in Redis", leased.keys() - snap.leases.keys()),
                ("delayed in the journal but not in Redis", delayed.keys() - snap.delayed.keys()),
                ("delayed in Redis but not in the journal", snap.delayed.keys() - delayed.keys()),
            ):
                if ids:
                    found.append(f"{queue.name}: {len(ids)} {label}: {_sample(ids)}")
        for name in sorted(await self.redis.queue_names() - {q.name for q in queues}):
            found.append(f"{name}: keys in Redis for a queue the journal does not have")
        return found


def _sample(ids: set[int], limit: int = 10) -> str:
    shown = sorted(ids)[:limit]
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(map(str, shown)) + more
