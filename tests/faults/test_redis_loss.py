"""Redis is lost under a running broker (FLUSHALL; a restart with nothing in it): the broker notices, rebuilds Redis
from the journal, and every message is then delivered exactly once, held leases included (DESIGN.md invariants 2
and 7, RELIABILITY.md G1-G4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.stores.keys import queue_keys
from tests.faults.checker import History, Outcome
from tests.faults.conftest import Brokers
from tests.faults.workload import (
    ack,
    api,
    consume_batch,
    consume_until,
    create_queue,
    drain,
    journal_check,
    login,
    publish,
    publish_many,
    queue_counts,
    settle,
    storm,
    wait_consistent,
    wait_rebuilt,
)
from tests.support import RedisProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

NO_DIFFERENCES = "no differences between Redis and the journal"
RACE_ROUNDS = 16


async def test_flushall_under_a_running_broker_is_rebuilt_and_each_message_delivered_once(
    private_redis: RedisProcess, brokers: Brokers, data_dir: Path
) -> None:
    broker = await brokers.start(private_redis.url)
    token = await login(broker.url)
    history = History()
    async with api(broker.url, token) as client:
        await create_queue(client, "flushed")
        await publish_many(client, "flushed", history, 500)
        code, output = await journal_check(data_dir, private_redis.url)
        assert code == 0, output

        flusher = aioredis.Redis.from_url(private_redis.url)
        try:
            assert await flusher.flushall()
        finally:
            await flusher.aclose()
        await wait_consistent(data_dir, private_redis.url)

        await drain(client, "flushed", history, consumers=4)
        counts = await queue_counts(client, "flushed")

    result = history.check()
    assert result.counts["ok"] == 500 and result.counts["delivered"] == 500, result.summary()
    assert result.lost == [] and result.unexpected == [] and result.duplicated == {}, result.summary()
    assert counts == {"pending": 0, "delayed": 0, "processing": 0, "processed": 500, "failed": 0}
    code, output = await journal_check(data_dir, private_redis.url)
    assert (code, output.strip()) == (0, NO_DIFFERENCES)


async def test_redis_restarted_empty_keeps_held_leases_and_delivers_the_rest_once(
    private_redis: RedisProcess, brokers: Brokers, data_dir: Path
) -> None:
    broker = await brokers.start(private_redis.url)
    token = await login(broker.url)
    history = History()
    async with api(broker.url, token) as client:
        await create_queue(client, "restarted")  # visibility timeout 30 s: the held leases outlive the test
        await publish_many(client, "restarted", history, 100)
        held = [history.deliver(item) for item in await consume_batch(client, "restarted", max_messages=10)]
        assert len(held) == 10

        private_redis.stop()
        private_redis.start()  # a new, empty redis-server on the same port
        await wait_consistent(data_dir, private_redis.url)

        await drain(client, "restarted", history, consumers=4, retry_503=True)
        drained = history.deliveries[len(held):]
        for delivered in held:
            answer = await ack(client, delivered.message_id, delivered.lease_id)
            assert history.ack(delivered, answer) is Outcome.OK, (answer.status_code, answer.text)
        counts = await queue_counts(client, "restarted")

    held_uids = {d.uid for d in held}
    assert [d.uid for d in drained if d.uid in held_uids] == [], "a held lease was handed out again"
    assert len(drained) == 90 and {d.delivery_count for d in drained} == {1}
    result = history.check()
    assert result.lost == [] and result.unexpected == [] and result.duplicated == {}, result.summary()
    assert counts == {"pending": 0, "delayed": 0, "processing": 0, "processed": 100, "failed": 0}
    code, output = await journal_check(data_dir, private_redis.url)
    assert (code, output.strip()) == (0, NO_DIFFERENCES)


async def test_flushall_twice_under_publish_and_consume_load_loses_nothing(
    private_redis: RedisProcess, brokers: Brokers, data_dir: Path
) -> None:
    """Redis is flushed twice while 4 publishers and 4 consumers run over a backlog, each consumer holding its
    deliveries a moment before acking. The leases open at a flush may be handed out again (G3's budget), but only
    as redeliveries, never after an ack; nothing is lost and nothing is invented."""
    broker = await brokers.start(private_redis.url)
    token = await login(broker.url)
    history = History()
    flusher = aioredis.Redis.from_url(private_redis.url)
    async with api(broker.url, token) as client:
        await create_queue(client, "busy")
        await publish_many(client, "busy", history, 300, prefix="backlog")
        stop_publishing, stop_consuming = asyncio.Event(), asyncio.Event()
        publishers = asyncio.create_task(storm(client, "busy", history, stop_publishing, workers=4))
        consumers = asyncio.create_task(consume_until(client, "busy", history, stop_consuming,
                                                      hold_seconds=0.1))
        try:
            for pause in (1.0, 0.7):
                await asyncio.sleep(pause)
                assert await flusher.flushall()
            await asyncio.sleep(1.0)
        finally:
            stop_publishing.set()
            await publishers
            stop_consuming.set()
            await consumers
            await flusher.aclose()
        delivered_under_load = len(history.deliveries)
        await wait_rebuilt(private_redis.url)
        await drain(client, "busy", history, consumers=2, retry_503=True)
        counts = await queue_counts(client, "busy")

    result = history.check()
    summary = result.summary()
    assert delivered_under_load > 50, f"the consumers hardly ran: {summary}"
    answered = {s for s in history.statuses if s.isdigit()}
    assert answered <= {"201", "503"}, f"a publish got something other than 201 or 503: {history.statuses}"
    assert result.lost == [] and result.unexpected == [], summary
    assert result.failed_but_delivered == [] and result.redelivered_after_ack == [], summary
    redelivered_too_soon = [d for d in history.deliveries
                            if d.uid in result.duplicated and d.delivery_count < 2 and
                            d is not next(e for e in history.deliveries if e.uid == d.uid)]
    assert redelivered_too_soon == [], f"a redelivery without delivery_count >= 2: {redelivered_too_soon[:5]}"
    # At most the leases open at the two flushes: 4 consumers x 10 messages each, twice.
    assert len(result.duplicated) <= 2 * 4 * 10, summary
    assert counts["pending"] == counts["processing"] == 0, counts
    code, output = await journal_check(data_dir, private_redis.url)
    assert (code, output.strip()) == (0, NO_DIFFERENCES)


async def test_once_redis_is_back_and_rebuilt_publish_and_consume_do_not_fail(
    private_redis: RedisProcess, brokers: Brokers, data_dir: Path
) -> None:
    """G4/G5: 503 is for while Redis cannot be used. Once a restarted Redis answers and the broker has rebuilt it
    (journal check agrees), publishes and consumes succeed again, even on connections opened before the restart."""
    broker = await brokers.start(private_redis.url)
    token = await login(broker.url)
    history = History()
    async with api(broker.url, token) as client:
        await create_queue(client, "healed")
        await publish_many(client, "healed", history, 100, prefix="before")  # 8 at a time: a pool of connections

        private_redis.stop()
        private_redis.start()
        await wait_consistent(data_dir, private_redis.url)  # Redis is back, and equal to the journal again

        before = history.statuses.copy()
        await asyncio.gather(*(publish(client, "healed", history, f"after-{n}") for n in range(16)))
        after = history.statuses - before
        await drain(client, "healed", history, consumers=4, retry_503=True)

    result = history.check()
    assert result.lost == [] and result.unexpected == [] and result.duplicated == {}, result.summary()
    assert set(after) == {"201"} and history.refused_consumes == [], (
        f"after Redis was back and rebuilt, publishes answered {dict(after)} and "
        f"{len(history.refused_consumes)} consume(s) answered 503: {history.refused_consumes[:2]}"
    )


async def test_a_rebuild_racing_publishes_leaves_redis_equal_to_the_journal(
    private_redis: RedisProcess, brokers: Brokers, data_dir: Path
) -> None:
    """Invariant 7: a rebuild that runs while publishes are between their journal commit and their Redis push must
    still converge: once the load stops, `journal check` finds no difference (no id twice in ready).

    The window is short, so Redis is flushed (and rebuilt) up to RACE_ROUNDS times under a publish storm, stopping
    at the first round after which the ready list holds an id twice (no consumer runs: nothing else makes one)."""
    broker = await brokers.start(private_redis.url)
    token = await login(broker.url)
    history = History()
    flusher = aioredis.Redis.from_url(private_redis.url)
    ready_key = queue_keys("raced").ready
    rounds = 0
    async with api(broker.url, token) as client:
        await create_queue(client, "raced")
        stop = asyncio.Event()
        publishers = asyncio.create_task(storm(client, "raced", history, stop))
        try:
            for _ in range(RACE_ROUNDS):
                rounds += 1
                await asyncio.sleep(0.1)
                assert await flusher.flushall()
                await wait_rebuilt(private_redis.url)
                await asyncio.sleep(0.05)
                ready = await flusher.lrange(ready_key, 0, -1)
                if len(ready) != len(set(ready)):
                    break
        finally:
            stop.set()
            await publishers
            await flusher.aclose()
        await wait_rebuilt(private_redis.url)
        after_load = await settle(data_dir, private_redis.url, within=3.0)

        await drain(client, "raced", history, consumers=2)
        counts = await queue_counts(client, "raced")

    result = history.check()
    assert result.lost == [] and result.unexpected == [] and result.duplicated == {}, result.summary()
    assert counts["pending"] == counts["processing"] == 0, counts
    code, output = await journal_check(data_dir, private_redis.url)
    assert (code, output.strip()) == (0, NO_DIFFERENCES)  # draining refused the stale copies
    assert after_load[0] == 0, (
        f"after {rounds} rebuild(s) under load, with no load running any more, Redis disagrees with the "
        f"journal:\n{after_load[1]}"
    )
