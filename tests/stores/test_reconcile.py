"""Reconciler: Redis rebuilt from the journal (DESIGN.md, invariant 7), on real Redis and a real SQLite file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.gate import Gate
from app.models import Message, NewMessage, Queue, QueueSettings
from app.recovery import Reconciler
from app.stores import keys
from app.stores.redis_queue import RedisQueueStore
from app.stores.sqlite_journal import SqliteJournalStore


@dataclass
class World:
    journal: SqliteJournalStore
    redis: RedisQueueStore
    reconciler: Reconciler
    queue: Queue
    pending: list[int]
    processing: list[Message]


@pytest.fixture
async def world(tmp_path: Path, redis_url: str) -> AsyncIterator[World]:
    """Queue q: five messages published, the 2nd and 4th delivered (processing under a lease); Redis in step."""
    async with SqliteJournalStore(tmp_path / "j.sqlite3") as journal, RedisQueueStore(redis_url) as redis:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        published = await journal.publish(queue, [NewMessage(content=f'"{i}"') for i in range(5)], "test")
        ids = [r.message_id for r in published]
        await redis.enqueue("q", ids)
        to_deliver = [ids[1], ids[3]]
        for message_id in to_deliver:  # move exactly these ids, as a consumer's take would
            await redis.redis.lrem(keys.queue_keys("q").ready, 1, message_id)
            await redis.redis.lpush(keys.queue_keys("q").processing, message_id)
        delivered, refused, _ = await journal.record_deliveries(queue, to_deliver, time.time() + 60, "consumer")
        assert refused == []
        await redis.restore_leases("q", {m.id: m.lease_expires_at or 0 for m in delivered})
        pending = [i for i in ids if i not in to_deliver]
        yield World(journal, redis, Reconciler(journal, redis, Gate()), queue, pending, delivered)


async def _state(redis: RedisQueueStore) -> dict[str, object]:
    """Every key the broker has in Redis with its full content (to compare two states exactly)."""
    state: dict[str, object] = {}
    async for raw in redis.redis.scan_iter(match=f"{keys.PREFIX}:*"):
        key = raw.decode()
        kind = (await redis.redis.type(key)).decode()
        if kind == "list":
            state[key] = await redis.redis.lrange(key, 0, -1)
        elif kind == "zset":
            state[key] = await redis.redis.zrange(key, 0, -1, withscores=True)
        elif key != keys.EPOCH_KEY:
            state[key] = kind
    return state


async def test_reconcile_after_flushall_restores_ready_processing_and_leases(world: World) -> None:
    assert await world.reconciler.differences() == []
    await world.redis.redis.flushall()
    assert await world.reconciler.differences() != []

    report = await world.reconciler.reconcile()

    assert (report.queues, report.ready, report.processing, report.dropped_queues) == (1, 3, 2, 0)
    snap = await world.redis.snapshot("q")
    assert sorted(snap.ready) == world.pending
    assert sorted(snap.processing) == sorted(m.id for m in world.processing)
    assert snap.leases == pytest.approx({m.id: m.lease_expires_at for m in world.processing}, abs=0.01)
    assert await world.redis.get_epoch() is not None
    assert world.reconciler.redis_up
    # Oldest first, as before the loss.
    assert await world.redis.take("q", 10, time.time() + 30) == world.pending


async def test_differences_are_empty_after_reconcile(world: World) -> None:
    await world.redis.redis.flushall()
    await world.reconciler.reconcile()

    assert await world.reconciler.differences() == []


async def test_differences_name_an_id_missing_from_ready(world: World) -> None:
    missing = world.pending[1]
    await world.redis.redis.lrem(keys.queue_keys("q").ready, 0, missing)

    found = await world.reconciler.differences()

    assert len(found) == 1
    assert "pending in the journal but not ready in Redis" in found[0]
    assert str(missing) in found[0]


async def test_differences_name_an_extra_id_pushed_to_ready(world: World) -> None:
    acked = world.processing[0]
    await world.journal.ack(acked.id, acked.lease_id, "consumer")
    await world.redis.release("q", [acked.id])
    assert await world.reconciler.differences() == []
    await world.redis.enqueue("q", [acked.id, 4242])

    found = await world.reconciler.differences()

    assert len(found) == 1
    assert "ready in Redis but not pending in the journal" in found[0]
    assert f"{acked.id}, 4242" in found[0]


async def test_differences_name_a_duplicate_and_a_processing_id_without_lease(world: World) -> None:
    duplicate, unleased = world.pending[0], world.processing[0].id
    await world.redis.enqueue("q", [duplicate])
    await world.redis.redis.zrem(keys.queue_keys("q").leases, unleased)

    found = "\n".join(await world.reconciler.differences())

    assert f"ready in Redis more than once: {duplicate}" in found
    assert f"processing without a lease in Redis: {unleased}" in found


async def test_reconcile_repairs_a_drifted_redis(world: World) -> None:
    k = keys.queue_keys("q")
    await world.redis.redis.lrem(k.ready, 0, world.pending[0])
    await world.redis.enqueue("q", [4242, world.pending[1]])
    await world.redis.redis.delete(k.leases)
    assert len(await world.reconciler.differences()) >= 3

    await world.reconciler.reconcile()

    assert await world.reconciler.differences() == []


async def test_reconcile_is_idempotent(world: World) -> None:
    await world.redis.redis.flushall()
    await world.reconciler.reconcile()
    once = await _state(world.redis)

    await world.reconciler.reconcile()
    twice = await _state(world.redis)

    assert once == twice
    assert set(once) == {keys.queue_keys("q").ready, keys.queue_keys("q").processing, keys.queue_keys("q").leases}
    assert await world.reconciler.differences() == []


async def test_reconcile_drops_keys_of_queues_the_journal_does_not_have(world: World) -> None:
    await world.redis.enqueue("ghost", [1, 2])
    await world.redis.take("ghost", 1, time.time() + 30)
    await world.redis.redis.lpush(keys.rebuild_keys("ghost").ready, 3)
    found = await world.reconciler.differences()
    assert "ghost: keys in Redis for a queue the journal does not have" in found

    report = await world.reconciler.reconcile()

    assert report.dropped_queues == 1
    assert await world.redis.queue_names() == {"q"}
    assert not await world.redis.redis.exists(*keys.queue_keys("ghost").all(), *keys.rebuild_keys("ghost").all())
    assert await world.reconciler.differences() == []


async def test_reconcile_empties_a_queue_whose_messages_are_all_done(world: World) -> None:
    for message in world.processing:
        await world.journal.ack(message.id, message.lease_id, "consumer")
    await world.journal.purge_queue(world.queue, "admin")
    # Redis still holds every id: the acks and the purge were journaled but never applied to Redis.

    await world.reconciler.reconcile()

    snap = await world.redis.snapshot("q")
    assert (snap.ready, snap.processing, snap.leases) == ([], [], {})
    assert await world.reconciler.differences() == []


async def test_reconcile_restores_a_delayed_message_with_its_due_time(world: World) -> None:
    (result,) = await world.journal.publish(world.queue, [NewMessage(content='"later"', delay_seconds=600)], "test")
    await world.redis.schedule("q", {result.message_id: result.available_at})
    assert await world.reconciler.differences() == []
    await world.redis.redis.flushall()
    found = "\n".join(await world.reconciler.differences())
    assert f"delayed in the journal but not in Redis: {result.message_id}" in found

    await world.reconciler.reconcile()

    snap = await world.redis.snapshot("q")
    assert snap.delayed == pytest.approx({result.message_id: result.available_at}, abs=0.01)
    assert result.message_id not in snap.ready
    assert await world.reconciler.differences() == []


async def test_an_eviction_policy_other_than_noeviction_is_reported(tmp_path: Path, redis_url: str) -> None:
    import redis as redis_client

    from app.gate import Gate
    from app.recovery import Reconciler

    client = redis_client.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        async with SqliteJournalStore(tmp_path / "j.sqlite3") as journal, RedisQueueStore(redis_url) as redis:
            reconciler = Reconciler(journal, redis, Gate())
            await reconciler.reconcile()
            assert reconciler.eviction_policy == "allkeys-lru"
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
