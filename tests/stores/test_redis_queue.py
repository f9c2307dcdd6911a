"""RedisQueueStore and its Lua scripts, on the session's real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import ConnectionPool
from redis.crc import key_slot

from app.errors import RedisUnavailable
from app.stores import keys
from app.stores.pipeliner import Pipeliner
from app.stores.redis_queue import RedisQueueStore
from tests.support import RedisProcess, free_port


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    async with RedisQueueStore(redis_url) as queue_store:
        yield queue_store


async def _chunks(*chunks: list[int]) -> AsyncIterator[list[int]]:
    for chunk in chunks:
        yield chunk


async def _leased_chunks(*chunks: list[tuple[int, float]]) -> AsyncIterator[list[tuple[int, float]]]:
    for chunk in chunks:
        yield chunk


# -- take ---------------------------------------------------------------------------------------------------------


async def test_take_moves_ids_oldest_first_to_processing_with_a_lease_each(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1, 2, 3])
    deadline = time.time() + 30

    taken = await store.take("q", 2, deadline)

    assert taken == [1, 2]
    snap = await store.snapshot("q")
    assert snap.ready == [3]
    assert sorted(snap.processing) == [1, 2]
    assert set(snap.leases) == {1, 2}
    for lease in snap.leases.values():
        assert lease == pytest.approx(deadline, abs=0.01)
    assert await store.take("q", 5, deadline) == [3]


async def test_ids_enqueued_in_later_calls_are_taken_after_earlier_ones(store: RedisQueueStore) -> None:
    await store.enqueue("q", [10, 11])
    await store.enqueue("q", [12])
    await asyncio.gather(store.enqueue("q", [13]), store.enqueue("other", [99]))  # one pipeline

    assert await store.take("q", 10, time.time() + 30) == [10, 11, 12, 13]
    assert await store.take("other", 10, time.time() + 30) == [99]


async def test_take_on_an_empty_queue_returns_nothing(store: RedisQueueStore) -> None:
    assert await store.take("q", 10, time.time() + 30) == []
    snap = await store.snapshot("q")
    assert snap.processing == [] and snap.leases == {}


# -- wait_take ----------------------------------------------------------------------------------------------------


async def test_wait_take_blocks_until_an_id_is_pushed_then_returns_it(store: RedisQueueStore) -> None:
    async def push_later() -> None:
        await asyncio.sleep(0.2)
        await store.enqueue("q", [7])

    pusher = asyncio.create_task(push_later())
    loop = asyncio.get_running_loop()
    started = loop.time()
    before = time.time()

    taken = await store.wait_take("q", 10.0, lease_seconds=30.0)

    elapsed = loop.time() - started
    await pusher
    assert taken is not None
    message_id, deadline = taken
    assert message_id == 7
    assert elapsed < 5.0, "wait_take returned only at the end of its wait, not when the id was pushed"
    assert before + 30.0 <= deadline <= time.time() + 30.0
    snap = await store.snapshot("q")
    assert snap.ready == []
    assert snap.processing == [7]
    assert snap.leases[7] == pytest.approx(deadline, abs=0.01)


async def test_wait_take_returns_none_when_nothing_arrives_during_its_wait(store: RedisQueueStore) -> None:
    assert await store.wait_take("q", 0.3, lease_seconds=30.0) is None
    snap = await store.snapshot("q")
    assert snap.processing == [] and snap.leases == {}


# -- release and requeue ------------------------------------------------------------------------------------------


async def test_release_removes_one_processing_entry_and_the_lease(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1, 2])
    await store.take("q", 2, time.time() + 30)
    # A duplicate copy of id 1 in processing: release forgets one delivery, not every copy.
    await store.redis.lpush(keys.queue_keys("q").processing, 1)

    removed = await store.release("q", [1])

    assert removed == 1
    snap = await store.snapshot("q")
    assert sorted(snap.processing) == [1, 2]
    assert set(snap.leases) == {2}
    assert await store.release("q", []) == 0


async def test_release_of_an_id_not_in_processing_removes_nothing(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1])
    assert await store.release("q", [1]) == 0
    assert (await store.snapshot("q")).ready == [1]


async def test_requeue_puts_an_id_back_to_be_taken_next(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1, 2, 3])
    assert await store.take("q", 1, time.time() + 30) == [1]

    await store.requeue("q", [1])

    snap = await store.snapshot("q")
    assert snap.processing == [] and snap.leases == {}
    assert await store.take("q", 3, time.time() + 30) == [1, 2, 3]


# -- reap ---------------------------------------------------------------------------------------------------------


async def test_reap_moves_only_ids_whose_lease_has_expired(store: RedisQueueStore) -> None:
    now = time.time()
    await store.enqueue("q", [1, 2, 3])
    await store.take("q", 1, now - 5)  # 1: expired
    await store.take("q", 1, now + 60)  # 2: live
    await store.enqueue("q", [4])

    reaped = await store.reap("q", now)

    assert reaped == [1]
    snap = await store.snapshot("q")
    assert snap.processing == [2]
    assert set(snap.leases) == {2}
    assert sorted(snap.ready) == [1, 3, 4]
    # The reaped id goes to the head of the line: it was the oldest.
    assert await store.take("q", 10, now + 60) == [1, 3, 4]
    assert await store.reap("q", now) == []


async def test_reap_respects_its_limit(store: RedisQueueStore) -> None:
    now = time.time()
    await store.enqueue("q", [1, 2, 3])
    await store.take("q", 3, now - 1)

    first = await store.reap("q", now, limit=2)
    second = await store.reap("q", now, limit=2)

    assert len(first) == 2
    assert sorted(first + second) == [1, 2, 3]


async def test_two_concurrent_reaps_never_return_the_same_id(redis_url: str) -> None:
    now = time.time()
    ids = list(range(1, 401))
    async with RedisQueueStore(redis_url) as a, RedisQueueStore(redis_url) as b:
        await a.enqueue("q", ids)
        assert len(await a.take("q", len(ids), now - 1)) == len(ids)

        rounds = [asyncio.gather(a.reap("q", now, limit=7), b.reap("q", now, limit=7)) for _ in range(40)]
        results = await asyncio.gather(*rounds)

        reaped = [i for pair in results for batch in pair for i in batch]
        assert len(reaped) == len(set(reaped)), "an expired id was reaped twice"
        assert sorted(reaped) == ids
        snap = await a.snapshot("q")
        assert snap.processing == [] and snap.leases == {}
        assert sorted(snap.ready) == ids


# -- delayed ------------------------------------------------------------------------------------------------------


async def test_promote_moves_only_due_ids_behind_those_already_ready(store: RedisQueueStore) -> None:
    now = time.time()
    await store.enqueue("q", [1])
    await store.schedule("q", {2: now - 1, 3: now + 60})

    assert await store.promote("q", now) == [2]

    snap = await store.snapshot("q")
    assert snap.delayed == pytest.approx({3: now + 60}, abs=0.01)
    assert await store.take("q", 10, now + 30) == [1, 2]
    assert await store.promote("q", now) == []


async def test_defer_moves_a_delivered_id_from_processing_to_delayed(store: RedisQueueStore) -> None:
    now = time.time()
    await store.enqueue("q", [1, 2])
    await store.take("q", 2, now + 30)

    await store.defer("q", {1: now + 5})

    snap = await store.snapshot("q")
    assert snap.processing == [2]
    assert set(snap.leases) == {2}
    assert snap.delayed == pytest.approx({1: now + 5}, abs=0.01)


# -- rebuild and swap ---------------------------------------------------------------------------------------------


async def test_rebuild_replaces_every_structure_of_the_queue(store: RedisQueueStore) -> None:
    k = keys.queue_keys("q")
    await store.enqueue("q", [90, 91])
    await store.take("q", 1, time.time() + 5)  # 90 in processing with a lease
    await store.redis.zadd(k.delayed, {"92": int(time.time() * 1000)})
    deadline, due = time.time() + 42, time.time() + 600

    await store.rebuild(
        "q", _chunks([1, 2], [3]), _leased_chunks([(4, deadline)], [(5, deadline + 1)]), _leased_chunks([(6, due)])
    )

    snap = await store.snapshot("q")
    assert sorted(snap.ready) == [1, 2, 3]
    assert sorted(snap.processing) == [4, 5]
    assert snap.leases == pytest.approx({4: deadline, 5: deadline + 1}, abs=0.01)
    assert snap.delayed == pytest.approx({6: due}, abs=0.01), "the old delayed id 92 must be gone"
    assert not await store.redis.exists(*keys.rebuild_keys("q").all()), "scratch keys were left behind"
    # Oldest first: the ids stream out of the journal by id and are taken in that order.
    assert await store.take("q", 10, time.time() + 30) == [1, 2, 3]


async def test_rebuild_with_nothing_to_restore_empties_the_queue(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1, 2])
    await store.take("q", 1, time.time() + 30)

    await store.rebuild("q", _chunks(), _leased_chunks(), _leased_chunks())

    snap = await store.snapshot("q")
    assert (snap.ready, snap.processing, snap.leases, snap.delayed) == ([], [], {}, {})
    assert await store.queue_names() == set()


async def test_the_swap_is_atomic_for_a_concurrent_reader(store: RedisQueueStore) -> None:
    """A transactional snapshot taken while rebuilds run sees either the old or the new state, never a mix."""
    old, new = [1, 2, 3], [4, 5, 6]
    await store.enqueue("q", old)
    seen: list[list[int]] = []

    async def rebuild_many() -> None:
        for n in range(30):
            ids = new if n % 2 == 0 else old
            await store.rebuild("q", _chunks(ids), _leased_chunks(), _leased_chunks())

    async def read_many() -> None:
        for _ in range(60):
            seen.append(sorted((await store.snapshot("q")).ready))
            await asyncio.sleep(0)

    await asyncio.gather(rebuild_many(), read_many())

    assert {tuple(s) for s in seen} <= {tuple(old), tuple(new)}


# -- keys ---------------------------------------------------------------------------------------------------------


async def test_queue_names_finds_every_queue_with_keys_left_in_redis(store: RedisQueueStore) -> None:
    await store.enqueue("jobs", [1])
    await store.enqueue("mail.out", [2])
    await store.take("mail.out", 1, time.time() + 30)  # only processing and leases remain
    await store.redis.lpush(keys.rebuild_keys("half-built").ready, 3)
    await store.set_epoch("e1")

    assert await store.queue_names() == {"jobs", "mail.out", "half-built"}

    await store.drop_queue("jobs")
    await store.drop_queue("half-built")
    assert await store.queue_names() == {"mail.out"}


async def test_keys_carry_the_queue_name_in_a_hash_tag() -> None:
    for name in ("jobs", "a.b-c_d", "x"):
        all_keys = (*keys.queue_keys(name).all(), *keys.rebuild_keys(name).all())
        assert all(f"{{{name}}}" in key for key in all_keys)
        assert len(set(all_keys)) == 8
        assert {key_slot(key.encode()) for key in all_keys} == {key_slot(name.encode())}
        assert all(keys.queue_of_key(key) == name for key in all_keys)
    assert keys.queue_of_key(keys.EPOCH_KEY) is None
    assert keys.queue_of_key("other:{jobs}:ready") is None


# -- release without waiting (an ack) ------------------------------------------------------------------------------


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_release_not_waited_for_happens_even_after_redis_lost_its_scripts(store: RedisQueueStore) -> None:
    await store.enqueue("q", [1, 2])
    await store.take("q", 2, time.time() + 30)
    await store.redis.script_flush()  # Redis restarted from a snapshot, say: its scripts are gone
    failures: list[Exception] = []

    store.release_later("q", [1], failures.append)

    async def released() -> bool:
        snap = await store.snapshot("q")
        return snap.processing == [2] and set(snap.leases) == {2}

    assert await _until(released), await store.snapshot("q")
    assert failures == []


async def test_a_release_not_waited_for_reports_a_redis_it_cannot_reach() -> None:
    async with RedisQueueStore(f"redis://127.0.0.1:{free_port()}/0", command_timeout=0.5) as unreachable:
        failures: list[Exception] = []
        unreachable.release_later("q", [1], failures.append)

        async def reported() -> bool:
            return bool(failures)

        assert await _until(reported)
        assert isinstance(failures[0], RedisUnavailable)



# -- the pipeliner -------------------------------------------------------------------------------------------------


async def test_a_pipeline_redis_does_not_answer_in_time_is_not_retried_and_its_connection_is_dropped(
    tmp_path: Path,
) -> None:
    """A stopped Redis (SIGSTOP: the kernel still accepts connections) times out once: retrying would make the
    caller wait several deadlines and would send the commands again on a fresh connection."""
    server = RedisProcess(tmp_path / "redis").start()
    assert server.process is not None
    pool = ConnectionPool.from_url(server.url, socket_timeout=None, socket_connect_timeout=1)
    opened = 0
    get_connection = pool.get_connection

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return await get_connection(*args, **kwargs)

    pool.get_connection = counted  # type: ignore[method-assign]
    pipeliner = Pipeliner(pool, timeout=0.3)
    try:
        assert await pipeliner.call("PING") == b"PONG"
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await pipeliner.call("SET", "k", "v")
            assert opened == 1
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await pipeliner.call("PING") == b"PONG"  # on a fresh connection
        assert opened == 2
    finally:
        await pipeliner.close()
        await pool.disconnect()
        server.stop()


async def test_a_pipelined_change_that_fails_after_its_caller_went_away_is_reported(tmp_path: Path) -> None:
    """A request cancelled while its change waits for Redis: if that change then fails, nobody awaits the error, yet
    what it changed is missing from Redis. The pipeliner reports it (the broker then rebuilds Redis)."""
    server = RedisProcess(tmp_path / "redis").start()
    assert server.process is not None
    pool = ConnectionPool.from_url(server.url, socket_timeout=None, socket_connect_timeout=1)
    pipeliner = Pipeliner(pool, timeout=0.3)
    reported: list[BaseException] = []
    pipeliner.on_abandoned_failure = reported.append
    try:
        assert await pipeliner.call("PING") == b"PONG"
        os.kill(server.process.pid, signal.SIGSTOP)  # every round trip from now on times out
        try:
            pushing = asyncio.create_task(pipeliner.push("ready", [1, 2]))
            calling = asyncio.create_task(pipeliner.call("ZADD", "delayed", 1, 3))
            staying = asyncio.create_task(pipeliner.push("ready", [4]))  # shares the LPUSH, still awaited
            await asyncio.sleep(0.05)  # the pipeline is in flight
            pushing.cancel()
            calling.cancel()
            for task in (pushing, calling):
                with pytest.raises(asyncio.CancelledError):
                    await task
            with pytest.raises(TimeoutError):
                await staying
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert len(reported) == 2 and all(isinstance(e, TimeoutError) for e in reported), reported
        assert await pipeliner.call("PING") == b"PONG"
        ok = asyncio.create_task(pipeliner.call("SET", "k", "v"))
        await asyncio.sleep(0)
        ok.cancel()  # a change that went out and succeeded is not reported, answered or not
        await asyncio.gather(ok, return_exceptions=True)
        assert await pipeliner.call("GET", "k") == b"v"
        assert len(reported) == 2
    finally:
        await pipeliner.close()
        await pool.disconnect()
        server.stop()
