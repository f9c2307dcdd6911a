"""Redis is lost under a running broker (FLUSHALL; a restart with nothing in it): the broker notices, rebuilds Redis
from the journal, and every message is then delivered exactly once, held leases included (DESIGN.md invariants 2
and 7, RELIABILITY.md G1-G4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.faults.checker import History, Outcome
from tests.faults.conftest import Brokers
from tests.faults.workload import (
    ack,
    api,
    consume_batch,
    create_queue,
    drain,
    journal_check,
    login,
    publish_many,
    queue_counts,
    wait_consistent,
)
from tests.support import RedisProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

NO_DIFFERENCES = "no differences between Redis and the journal"


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

        await drain(client, "restarted", history, consumers=4)
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
