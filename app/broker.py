"""The broker service: the one place that orders journal and Redis writes (DESIGN.md, "Order of writes").

HTTP routes, GraphQL, SSE and the CLI all call this class; none of them talks to Redis or SQLite directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app.errors import JournalUnavailable, RedisUnavailable, ValidationFailed
from app.gate import Gate
from app.models import (
    Delivery,
    Event,
    Message,
    MessageStatus,
    NewMessage,
    PublishResult,
    Queue,
    QueueSettings,
    QueueStats,
)
from app.recovery import Reconciler
from app.settings import Settings
from app.stores.message_ops import IDEMPOTENCY_WINDOW_SECONDS
from app.stores.redis_queue import RedisQueueStore
from app.stores.sqlite_journal import SqliteJournalStore, Transition

log = logging.getLogger(__name__)
MAX_WAIT_SECONDS = 20.0
MAX_CONSUME = 100
MAX_STALE_ROUNDS = 10


class Broker:
    def __init__(self, settings: Settings, journal: SqliteJournalStore, redis: RedisQueueStore) -> None:
        self.settings = settings
        self.journal = journal
        self.redis = redis
        self.gate = Gate()
        self.recovery = Reconciler(journal, redis, self.gate)
        self._background: set[asyncio.Task[Any]] = set()
        if not journal.read_only:
            # A commit whose callers already heard "outcome unknown" made changes nobody carried to Redis (a
            # publish's ids, say): rebuild Redis from the journal.
            journal.add_late_commit_listener(self.recovery.mark_dirty)
        # A Redis change that follows a commit and fails after its caller went away (a cancelled request): the
        # same as one failing in front of it.
        redis.report_abandoned_failures(self._redis_failed_after_commit)

    # -- queues ------------------------------------------------------------------------------------------------

    async def queue(self, name: str) -> Queue:
        return await self.journal.find_queue(name)

    async def queue_stats(self, name: str) -> QueueStats:
        return await self._stats(await self.journal.find_queue(name))

    async def list_queue_stats(self) -> list[QueueStats]:
        return [await self._stats(q) for q in self.journal.queues()]

    async def _stats(self, queue: Queue) -> QueueStats:
        counts = await self.journal.counts(queue)
        oldest = await self.journal.oldest_pending_at(queue) if counts[MessageStatus.PENDING.value] else None
        return QueueStats(queue, counts, oldest)

    async def create_queue(self, name: str, settings: QueueSettings, actor: str) -> QueueStats:
        await self._check_dead_letter_queue(name, settings)
        queue = await self.journal.create_queue(name, settings, actor)
        return await self._stats(queue)

    async def update_queue(self, name: str, changes: dict[str, Any], actor: str) -> QueueStats:
        queue = await self.journal.find_queue(name)
        settings = QueueSettings(**{**queue.settings.as_dict(), **changes})
        await self._check_dead_letter_queue(name, settings)
        return await self._stats(await self.journal.update_queue(queue, settings, actor))

    async def _check_dead_letter_queue(self, name: str, settings: QueueSettings) -> None:
        dlq = settings.dead_letter_queue
        if dlq is None:
            return
        await self.journal.refresh()
        if dlq == name:
            raise ValidationFailed([{"field": "dead_letter_queue", "message": "a queue cannot be its own DLQ"}])
        by_name = {q.name: q for q in self.journal.queues()}
        if dlq not in by_name:
            raise ValidationFailed([{"field": "dead_letter_queue", "message": f"queue '{dlq}' does not exist"}])
        seen, hop = {name}, by_name.get(dlq)
        while hop is not None:  # a message failing in a cycle of dead-letter queues would never end `failed`
            if hop.name in seen:
                raise ValidationFailed([{"field": "dead_letter_queue", "message": "dead-letter queues form a cycle"}])
            seen.add(hop.name)
            hop = by_name.get(hop.settings.dead_letter_queue or "")

    async def delete_queue(self, name: str, actor: str) -> int:
        queue = await self.journal.find_queue(name)
        async with self.gate.exclusive():
            deleted = await self.journal.delete_queue(queue, actor)
            await self._redis_after_commit(self.redis.drop_queue(name))
        return deleted

    async def purge_queue(self, name: str, actor: str) -> int:
        queue = await self.journal.find_queue(name)
        async with self.gate.exclusive():
            since = await self.journal.last_seq()
            purged = await self.journal.purge_queue(queue, actor)
            await self._redis_after_commit(self.redis.purge(name))
            # Another broker process may have published to this queue between the commit and the purge of Redis:
            # put back whatever the journal changed since (duplicates are refused at delivery, never lost).
            await self._redis_after_commit(self.recovery.catch_up(since))
        return purged

    # -- messages ----------------------------------------------------------------------------------------------

    async def publish(self, name: str, items: list[NewMessage], actor: str) -> list[PublishResult]:
        """Journal first (answered only once durable), then hand the ids to Redis."""
        queue = await self.journal.find_queue(name)
        if not self.recovery.redis_up:
            raise RedisUnavailable("Redis is unavailable; nothing was published, retry later")
        # The gate spans the commit and the push, so a rebuild of Redis sees the message either in the journal
        # and not yet pushed (and pushes it itself) or pushed; never pushed twice.
        async with self.gate.shared():
            committed = self.journal.publish(queue, items, actor)
            try:
                results = await asyncio.shield(committed)
            except asyncio.CancelledError:
                # The caller went away (a closed connection, a cancelled subscription): the publish commits all
                # the same, and its ids must still reach Redis. (A rebuild that slips in before that push has put
                # them there already: the second copy is refused at delivery.)
                committed.add_done_callback(lambda done: self._spawn(self._push_committed(queue.name, done)))
                raise
            await self._push_published(queue.name, results)
        return results

    async def _push_committed(self, queue: str, committed: asyncio.Future[list[PublishResult]]) -> None:
        if not committed.cancelled() and committed.exception() is None:
            async with self.gate.shared():
                await self._push_published(queue, committed.result())

    async def _push_published(self, queue: str, results: list[PublishResult]) -> None:
        fresh = [r for r in results if not r.duplicate]
        ready = [r.message_id for r in fresh if r.status is MessageStatus.PENDING]
        due = {r.message_id: r.available_at for r in fresh if r.status is MessageStatus.DELAYED}
        try:
            if ready:  # the LPUSH is in the next pipeline before this awaits anything
                await self._redis_after_commit(self.redis.enqueue(queue, ready))
        except asyncio.CancelledError:
            if due:  # the caller went away meanwhile: the delayed ones must still get to Redis
                self._spawn(self._gated(self.redis.schedule(queue, due)))
            raise
        if due:
            await self._redis_after_commit(self.redis.schedule(queue, due))

    async def _gated(self, change: Any) -> None:
        async with self.gate.shared():
            await self._redis_after_commit(change)

    async def consume(
        self, name: str, *, max_messages: int = 1, wait: float = 0.0, visibility_timeout: float | None = None,
        actor: str,
    ) -> list[Delivery]:
        """Hand up to `max_messages` ready messages to one caller, each under a fresh lease."""
        queue = await self.journal.find_queue(name)
        lease_seconds = visibility_timeout if visibility_timeout is not None else queue.settings.visibility_timeout
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + min(wait, MAX_WAIT_SECONDS)
        stale_rounds = 0
        while True:
            self.recovery.require_redis()
            lease_deadline = time.time() + lease_seconds
            async with self.gate.shared():  # spans the take and its journal record, as publish does
                try:
                    ids = await self.redis.take(queue.name, max_messages, lease_deadline)
                except RedisUnavailable:
                    self.recovery.mark_dirty()
                    raise
                deliveries = await self._record_deliveries(queue, ids, lease_deadline, actor) if ids else []
            remaining = give_up_at - loop.time()
            if not ids and remaining > 0:
                # Blocking outside the gate: a rebuild must not wait for long polls. If one ran meanwhile, the
                # id it took may have been put back in ready by it: take it back under its lease.
                rebuilds = self.recovery.reconciles
                lease_deadline, taken = await self._wait_take(queue, remaining, lease_seconds)
                if taken is None:
                    return []
                async with self.gate.shared():
                    deliveries = await self._record_deliveries(queue, [taken], lease_deadline, actor)
                    if deliveries and self.recovery.reconciles != rebuilds:
                        await self._redis_after_commit(self.redis.hold(queue.name, taken, lease_deadline))
            if deliveries:
                return deliveries
            if not ids and remaining <= 0:
                return []  # nothing ready, and no time left to wait
            # Everything taken was a stale copy the journal refused: the next ids may be real ones.
            stale_rounds += 1
            if stale_rounds > MAX_STALE_ROUNDS and give_up_at - loop.time() <= 0:
                return []

    async def _wait_take(self, queue: Queue, wait_seconds: float, lease_seconds: float) -> tuple[float, int | None]:
        # BLMOVE is shielded: if the caller goes away after Redis moved an id, the id is put back rather than
        # left in processing with no lease.
        task = asyncio.ensure_future(self.redis.wait_take(queue.name, wait_seconds, lease_seconds))
        try:
            taken = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._requeue_abandoned(queue.name, t))
            raise
        except RedisUnavailable:  # BLMOVE may have moved an id whose lease was never written: rebuild
            self.recovery.mark_dirty()
            raise
        if taken is None:
            return 0.0, None
        message_id, deadline = taken
        return deadline, message_id

    def _requeue_abandoned(self, queue: str, task: asyncio.Task[tuple[int, float] | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        taken = task.result()
        if taken is not None:
            self._spawn(self._redis_after_commit(self.redis.requeue(queue, [taken[0]])))

    async def _record_deliveries(
        self, queue: Queue, ids: list[int], lease_deadline: float, actor: str
    ) -> list[Delivery]:
        """Journal deliveries Redis handed out (the caller holds the shared gate)."""
        try:
            messages, refused, dead_lettered = await self.journal.record_deliveries(queue, ids, lease_deadline, actor)
        except JournalUnavailable:
            await self._redis_after_commit(self.redis.requeue(queue.name, ids))
            raise
        if refused:
            # Stale copies: drop them, and restore the lease of a legitimate holder of the same id.
            await self._redis_after_commit(self.redis.release(queue.name, [i for i, _ in refused]))
            held = {i: d for i, d in refused if d is not None}
            if held:
                await self._redis_after_commit(self.redis.restore_leases(queue.name, held))
        for change in dead_lettered:
            await self._redis_after_commit(self.redis.enqueue(change.message.queue, [change.message.id]))
        now = time.time()
        return [Delivery(m, m.lease_id or "", m.lease_expires_at or lease_deadline, now) for m in messages]

    async def ack(self, message_id: int, lease_id: str | None, actor: str) -> Message:
        """Journal `processed` first; then forget the delivery in Redis, without waiting for it: the ack is done
        once journaled, and a removal racing a rebuild of Redis is harmless (the rebuild reads the journal)."""
        async with self.gate.shared():
            message = await self.journal.ack(message_id, lease_id, actor)
        self.redis.release_later(message.queue, [message_id], self._redis_failed_after_commit)
        return message

    async def nack(
        self, message_id: int, lease_id: str | None, *, requeue: bool, delay: float = 0.0, reason: str | None,
        actor: str,
    ) -> Transition:
        """Journal the outcome first (the journal checks the lease), then move the id in Redis to match."""
        async with self.gate.shared():
            change = await self.journal.nack(message_id, lease_id, requeue, delay, reason, actor)
            await self._redis_after_commit(self._settle_delivery(change))
        return change

    async def _settle_delivery(self, change: Transition) -> None:
        """Make Redis match a delivery that ended: back to ready, delayed, another queue, or gone."""
        message, source = change.message, change.from_queue
        if message.queue != source:  # dead-lettered
            await self.redis.release(source, [message.id])
            await self.redis.enqueue(message.queue, [message.id])
        elif message.status is MessageStatus.PENDING:
            await self.redis.requeue(source, [message.id])
        elif message.status is MessageStatus.DELAYED:
            await self.redis.defer(source, {message.id: message.available_at})
        else:
            await self.redis.release(source, [message.id])

    async def extend(self, message_id: int, lease_id: str | None, seconds: float, actor: str) -> Message:
        """Journal the new deadline first, then move the lease in Redis (the reaper reads it there)."""
        async with self.gate.shared():
            message = await self.journal.extend(message_id, lease_id, seconds, actor)
            assert message.lease_expires_at is not None
            await self._redis_after_commit(
                self.redis.restore_leases(message.queue, {message.id: message.lease_expires_at})
            )
        return message

    async def redrive(self, name: str, limit: int, actor: str) -> int:
        """Failed messages back to pending; on a dead-letter queue, its messages back to where they came from."""
        queue = await self.journal.find_queue(name)
        async with self.gate.shared():
            changes = await self.journal.redrive(queue, limit, actor)
            by_queue: dict[str, list[int]] = {}
            for change in changes:
                by_queue.setdefault(change.message.queue, []).append(change.message.id)
            # One push per target queue (up to 10,000 ids). A copy left in the dead-letter queue's ready list is
            # refused at delivery (wrong queue).
            await asyncio.gather(*(self._redis_after_commit(self.redis.enqueue(target, ids))
                                   for target, ids in by_queue.items()))
        return len(changes)

    async def message(self, message_id: int) -> Message | None:
        return await self.journal.get_message(message_id)

    async def history(self, message_id: int) -> list[Event]:
        return await self.journal.history(message_id)

    async def browse(self, name: str, status: MessageStatus | None, after_id: int, limit: int) -> list[Message]:
        """Read a queue's messages by id; changes nothing."""
        return await self.journal.browse(await self.journal.find_queue(name), status, after_id, limit)

    # -- background work ---------------------------------------------------------------------------------------

    async def reap_expired_leases(self) -> int:
        """Return deliveries whose lease ran out to ready (Redis first, atomically), then journal it."""
        moved = 0
        now = time.time()
        for queue in self.journal.queues():
            async with self.gate.shared():
                ids = await self.redis.reap(queue.name, now)
                if not ids:
                    continue
                for change in await self.journal.expire_leases(ids):
                    if change.message.queue != change.from_queue:  # dead-lettered at its delivery limit
                        await self._redis_after_commit(self.redis.enqueue(change.message.queue, [change.message.id]))
            moved += len(ids)
        return moved

    async def promote_delayed(self) -> int:
        """Move due delayed messages to ready (Redis first, atomically), then journal them as pending."""
        promoted = 0
        now = time.time()
        for queue in self.journal.queues():
            async with self.gate.shared():
                ids = await self.redis.promote(queue.name, now)
                if ids:
                    promoted += await self.journal.promote_delayed(ids)
        return promoted

    async def apply_retention(self) -> int:
        """Delete terminal messages past their queue's retention, and idempotency keys past their window."""
        now = time.time()
        await self.journal.prune_idempotency_keys(now - IDEMPOTENCY_WINDOW_SECONDS)
        return await self.journal.prune_expired(now)

    async def _redis_after_commit(self, change: Any) -> None:
        """Run a Redis change that follows a committed journal change. If Redis fails now, the journal still
        holds the truth: mark Redis for reconciliation instead of failing a request that already committed."""
        try:
            await change
        except RedisUnavailable as exc:
            self._redis_failed_after_commit(exc)

    def _redis_failed_after_commit(self, exc: RedisUnavailable) -> None:
        log.warning("Redis change after commit failed; will reconcile: %s", exc.detail)
        self.recovery.mark_dirty()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def health(self) -> dict[str, bool]:
        return {"journal": await self.journal.ping(), "redis": await self.redis.ping()}
