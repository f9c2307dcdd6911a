"""Work-queue semantics: dead letters and redrive, delays, extend, idempotency, backpressure, retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import ApiClient, api_client


@pytest.fixture
async def admin(client: ApiClient) -> dict[str, str]:
    return await client.auth()


async def make_queue(client: ApiClient, headers: dict[str, str], name: str, **settings: Any) -> None:
    response = await client.post("/queues", json={"name": name, **settings}, headers=headers)
    assert response.status_code == 201, response.text


async def publish(client: ApiClient, headers: dict[str, str], queue: str, content: Any = "x", **extra: Any) -> Any:
    response = await client.post(f"/queues/{queue}/messages", json={"content": content, **extra}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def consume(client: ApiClient, headers: dict[str, str], queue: str, **body: Any) -> list[dict[str, Any]]:
    response = await client.post(f"/queues/{queue}/messages/consume", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def history_types(client: ApiClient, headers: dict[str, str], message_id: int) -> list[str]:
    events = (await client.get(f"/messages/{message_id}/history", headers=headers)).json()["events"]
    return [e["type"] for e in events]


async def test_past_max_deliveries_a_message_moves_to_the_dead_letter_queue_and_redrive_brings_it_back(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await make_queue(client, admin, "dlq")
    await make_queue(client, admin, "work", max_deliveries=2, dead_letter_queue="dlq")
    message_id = (await publish(client, admin, "work", {"job": 1}))["message_id"]
    for attempt in range(2):
        assert len(await consume(client, admin, "work")) == 1
        nack = await client.post(f"/messages/{message_id}/nack",
                                 json={"requeue": True, "reason": f"boom {attempt}"}, headers=admin)
        assert nack.status_code == 200
    assert nack.json()["dead_letter_queue"] == "dlq" and nack.json()["status"] == "pending"
    assert await consume(client, admin, "work") == []

    message = (await client.get(f"/messages/{message_id}", headers=admin)).json()
    assert message["queue"] == "dlq" and message["dead_lettered_from"] == "work"
    assert "delivery limit of 2" in message["last_error"] and "boom 1" in message["last_error"]
    types = await history_types(client, admin, message_id)
    assert types.count("message.delivered") == 2 and types[-1] == "message.dead_lettered"

    redriven = await client.post("/queues/dlq/redrive", headers=admin)
    assert redriven.status_code == 200 and redriven.json() == {"moved": 1}
    assert await consume(client, admin, "dlq") == []
    [again] = await consume(client, admin, "work")
    assert again["id"] == message_id and again["delivery_count"] == 1 and again["dead_lettered_from"] is None
    assert (await client.post(f"/messages/{message_id}/ack", json={"lease_id": again["lease_id"]},
                              headers=admin)).status_code == 200
    assert (await history_types(client, admin, message_id))[-3:] == [
        "message.redriven", "message.delivered", "message.acked"]


async def test_redrive_returns_failed_messages_of_a_plain_queue_to_pending(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await make_queue(client, admin, "plain")
    ids = [(await publish(client, admin, "plain", n))["message_id"] for n in range(3)]
    for delivery in await consume(client, admin, "plain", max=3):
        await client.post(f"/messages/{delivery['id']}/nack", json={"reason": "bad"}, headers=admin)
    assert (await client.get("/queues/plain", headers=admin)).json()["counts"]["failed"] == 3
    assert (await client.post("/queues/plain/redrive", json={"limit": 2}, headers=admin)).json() == {"moved": 2}
    assert [d["id"] for d in await consume(client, admin, "plain", max=10)] == ids[:2]


async def test_a_lease_that_runs_out_at_the_delivery_limit_dead_letters_the_message(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await make_queue(client, admin, "dl2")
    await make_queue(client, admin, "once", max_deliveries=1, dead_letter_queue="dl2")
    message_id = (await publish(client, admin, "once"))["message_id"]
    await consume(client, admin, "once", visibility_timeout=0.2)
    [moved] = await consume(client, admin, "dl2", wait=5)
    assert moved["id"] == message_id and moved["dead_lettered_from"] == "once"


async def test_delayed_messages_are_not_delivered_before_they_are_due_and_are_delivered_promptly_after(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await make_queue(client, admin, "later")
    published = await publish(client, admin, "later", "soon", delay_seconds=1.0)
    assert published["status"] == "delayed"
    queue = (await client.get("/queues/later", headers=admin)).json()
    assert queue["counts"]["delayed"] == 1
    started = time.monotonic()
    assert await consume(client, admin, "later") == []
    [delivery] = await consume(client, admin, "later", wait=10)
    waited = time.monotonic() - started
    assert delivery["id"] == published["message_id"]
    assert 0.9 <= waited < 5, waited  # due after 1 s; delivered within a few promoter ticks
    assert await history_types(client, admin, delivery["id"]) == [
        "message.published", "message.requeued", "message.delivered"]


async def test_nack_with_a_delay_holds_the_message_back_until_then(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "retry")
    message_id = (await publish(client, admin, "retry"))["message_id"]
    await consume(client, admin, "retry")
    nack = await client.post(f"/messages/{message_id}/nack", json={"requeue": True, "delay_seconds": 0.8},
                             headers=admin)
    assert nack.json()["status"] == "delayed"
    assert await consume(client, admin, "retry") == []
    [again] = await consume(client, admin, "retry", wait=10)
    assert again["id"] == message_id and again["delivery_count"] == 2


async def test_extend_keeps_the_lease_past_its_first_deadline(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "long")
    message_id = (await publish(client, admin, "long"))["message_id"]
    [delivery] = await consume(client, admin, "long", visibility_timeout=0.5)
    extended = await client.post(f"/messages/{message_id}/extend",
                                 json={"lease_id": delivery["lease_id"], "visibility_timeout": 30}, headers=admin)
    assert extended.status_code == 200 and extended.json()["lease_expires_at"] > delivery["lease_expires_at"]
    await asyncio.sleep(1.2)  # past the first deadline: the reaper must leave it alone
    assert await consume(client, admin, "long") == []
    ack = await client.post(f"/messages/{message_id}/ack", json={"lease_id": delivery["lease_id"]}, headers=admin)
    assert ack.status_code == 200
    stale = await client.post(f"/messages/{message_id}/extend", json={"lease_id": "old", "visibility_timeout": 5},
                              headers=admin)
    assert stale.status_code == 409


async def test_extend_with_a_stale_lease_is_409(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "ext")
    message_id = (await publish(client, admin, "ext"))["message_id"]
    await consume(client, admin, "ext")
    response = await client.post(f"/messages/{message_id}/extend",
                                 json={"lease_id": "stale", "visibility_timeout": 5}, headers=admin)
    assert response.status_code == 409 and response.json()["code"] == "stale_lease"
    missing = await client.post(f"/messages/{message_id}/extend", json={}, headers=admin)
    assert missing.status_code == 422


async def test_the_same_idempotency_key_publishes_once(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "idem")
    headers = {**admin, "Idempotency-Key": "order-42"}
    first = await client.post("/queues/idem/messages", json={"content": 1}, headers=headers)
    second = await client.post("/queues/idem/messages", json={"content": 1}, headers=headers)
    assert first.status_code == 201 and second.status_code == 200
    assert second.json()["duplicate"] is True and second.json()["message_id"] == first.json()["message_id"]
    assert second.json()["status"] == "pending"
    together = await asyncio.gather(*(client.post("/queues/idem/messages", json={"content": 2},
                                                  headers={**admin, "Idempotency-Key": "burst"}) for _ in range(10)))
    assert sorted(r.status_code for r in together) == [200] * 9 + [201]
    assert len({r.json()["message_id"] for r in together}) == 1
    assert (await client.get("/queues/idem", headers=admin)).json()["counts"]["pending"] == 2


async def test_an_idempotency_key_is_scoped_to_its_queue(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "a")
    await make_queue(client, admin, "b")
    headers = {**admin, "Idempotency-Key": "k"}
    assert (await client.post("/queues/a/messages", json={"content": 1}, headers=headers)).status_code == 201
    assert (await client.post("/queues/b/messages", json={"content": 1}, headers=headers)).status_code == 201


async def test_a_full_queue_answers_429_queue_full_with_retry_after(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "small", max_length=2)
    await publish(client, admin, "small")
    await publish(client, admin, "small")
    full = await client.post("/queues/small/messages", json={"content": 3}, headers=admin)
    assert full.status_code == 429 and full.json()["code"] == "queue_full" and full.headers["Retry-After"]
    batch = await client.post("/queues/small/messages/batch", json={"messages": [{"content": 1}]}, headers=admin)
    assert batch.status_code == 429
    [delivery] = await consume(client, admin, "small")
    await client.post(f"/messages/{delivery['id']}/ack", headers=admin)
    await publish(client, admin, "small")


async def test_retention_deletes_terminal_messages_past_their_age(
    client: ApiClient, admin: dict[str, str], broker: Any
) -> None:
    await make_queue(client, admin, "keep", retention_seconds=1)
    done = (await publish(client, admin, "keep", "done"))["message_id"]
    waiting = (await publish(client, admin, "keep", "waiting"))["message_id"]
    [delivery] = await consume(client, admin, "keep")
    await client.post(f"/messages/{delivery['id']}/ack", headers=admin)
    assert await broker.apply_retention() == 0  # not old enough yet
    await asyncio.sleep(1.1)
    assert await broker.apply_retention() == 1
    assert (await client.get(f"/messages/{done}", headers=admin)).status_code == 404
    assert (await client.get(f"/messages/{waiting}", headers=admin)).json()["status"] == "pending"
    assert (await history_types(client, admin, done))[-1] == "message.deleted"
    assert (await client.get("/queues/keep", headers=admin)).json()["counts"]["processed"] == 0


async def test_a_delay_longer_than_the_queue_keeps_messages_is_422(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "short", retention_seconds=60)
    response = await client.post("/queues/short/messages", json={"content": 1, "delay_seconds": 61}, headers=admin)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "delay_seconds"


async def test_an_idempotency_key_survives_a_restart(settings: Any) -> None:
    import httpx

    async def publish_once() -> httpx.Response:
        async with api_client(settings) as (client, _):
            headers = await client.auth()
            if (await client.get("/queues/r", headers=headers)).status_code == 404:
                await make_queue(client, headers, "r")
            return await client.post("/queues/r/messages", json={"content": 1},
                                     headers={**headers, "Idempotency-Key": "once"})

    first, after_restart = await publish_once(), await publish_once()
    assert first.status_code == 201 and after_restart.status_code == 200
    assert after_restart.json()["message_id"] == first.json()["message_id"]


async def test_extend_with_a_null_timeout_is_422(client: ApiClient, admin: dict[str, str]) -> None:
    await make_queue(client, admin, "nul")
    message_id = (await publish(client, admin, "nul"))["message_id"]
    await consume(client, admin, "nul")
    response = await client.post(f"/messages/{message_id}/extend", json={"visibility_timeout": None}, headers=admin)
    assert response.status_code == 422


async def test_a_delivery_that_reaches_its_limit_on_lease_expiry_goes_to_the_dead_letter_queue_not_the_caller(
    client: ApiClient, admin: dict[str, str], broker: Any
) -> None:
    await make_queue(client, admin, "dl3")
    await make_queue(client, admin, "limit1", max_deliveries=1, dead_letter_queue="dl3")
    message_id = (await publish(client, admin, "limit1"))["message_id"]
    await consume(client, admin, "limit1", visibility_timeout=0.05)
    await asyncio.sleep(0.1)
    # Redis hands the expired id out again before the reaper saw it: the journal dead-letters it instead.
    await broker.redis.reap("limit1", time.time())
    assert await consume(client, admin, "limit1") == []
    [moved] = await consume(client, admin, "dl3", wait=5)
    assert moved["id"] == message_id
    assert (await history_types(client, admin, message_id)).count("message.delivered") == 2


async def test_redrive_leaves_a_dead_lettered_message_alone_once_it_was_acked(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await make_queue(client, admin, "dl4")
    await make_queue(client, admin, "src4", max_deliveries=1, dead_letter_queue="dl4")
    message_id = (await publish(client, admin, "src4"))["message_id"]
    await consume(client, admin, "src4")
    await client.post(f"/messages/{message_id}/nack", json={"requeue": True}, headers=admin)
    [in_dlq] = await consume(client, admin, "dl4")
    await client.post(f"/messages/{message_id}/ack", json={"lease_id": in_dlq["lease_id"]}, headers=admin)
    assert (await client.post("/queues/dl4/redrive", headers=admin)).json() == {"moved": 0}
    assert (await client.get(f"/messages/{message_id}", headers=admin)).json()["status"] == "processed"


async def test_a_publish_whose_caller_went_away_after_submitting_still_reaches_redis(broker: Any) -> None:
    """A client that disconnects (its task cancelled) while its publish commits: the message is journaled all the
    same, so it must be deliverable, not stranded in the journal until the next rebuild."""
    from app.models import NewMessage, QueueSettings

    await broker.create_queue("gone", QueueSettings(), "test")
    publishing = asyncio.create_task(broker.publish("gone", [NewMessage(content='"orphan"')], "test"))
    await asyncio.sleep(0)  # queued for the next commit, not yet committed
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    for _ in range(100):
        if (await broker.redis.snapshot("gone")).ready:
            break
        await asyncio.sleep(0.01)
    [delivery] = await broker.consume("gone", actor="test")
    assert delivery.message.content == '"orphan"'
    assert await broker.recovery.differences() == []


async def test_a_mixed_publish_whose_caller_went_away_during_its_push_still_schedules_the_delayed_ones(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the ready ids are being pushed: the delayed ids of the same publish must reach Redis too."""
    from app.models import NewMessage, QueueSettings

    await broker.create_queue("mixed", QueueSettings(), "test")
    pushing = asyncio.Event()
    enqueue = broker.redis.enqueue

    async def enqueue_then_wait(queue: str, ids: list[int]) -> None:
        pushing.set()
        await enqueue(queue, ids)

    monkeypatch.setattr(broker.redis, "enqueue", enqueue_then_wait)
    publishing = asyncio.create_task(broker.publish(
        "mixed", [NewMessage(content='"now"'), NewMessage(content='"later"', delay_seconds=60)], "test"))
    await pushing.wait()
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    for _ in range(100):
        snapshot = await broker.redis.snapshot("mixed")
        if snapshot.ready and snapshot.delayed:
            break
        await asyncio.sleep(0.01)
    assert len(snapshot.ready) == 1 and len(snapshot.delayed) == 1
    assert await broker.recovery.differences() == []


async def test_a_publish_whose_caller_went_away_during_a_push_that_then_fails_gets_redis_rebuilt(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its ids are pushed, and then the push fails (Redis went away): the error reaches no caller,
    yet the message is journaled and missing from Redis. Redis must be marked for a rebuild, which brings it back."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app.models import NewMessage, QueueSettings

    await broker.create_queue("lost", QueueSettings(), "test")
    pipeliner = broker.redis._pipeliner
    execute = pipeliner._execute
    sent, fail = asyncio.Event(), asyncio.Event()

    async def push_fails_later(commands: list[Any]) -> list[Any]:
        if any(command[0] == "LPUSH" for command in commands):
            sent.set()
            await fail.wait()
            raise RedisConnectionError("Redis went away")
        return list(await execute(commands))

    monkeypatch.setattr(pipeliner, "_execute", push_fails_later)
    publishing = asyncio.create_task(broker.publish("lost", [NewMessage(content='"stranded?"')], "test"))
    await sent.wait()
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    fail.set()
    for _ in range(100):
        if not broker.recovery.redis_up:
            break
        await asyncio.sleep(0.01)
    assert not broker.recovery.redis_up  # publish and consume answer 503 until Redis is rebuilt
    monkeypatch.setattr(pipeliner, "_execute", execute)
    await broker.recovery.reconcile()
    assert await broker.recovery.differences() == []
    [delivery] = await broker.consume("lost", actor="test")
    assert delivery.message.content == '"stranded?"'


async def test_a_publish_answered_outcome_unknown_that_commits_later_still_reaches_redis(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog answers a commit stuck behind another process's lock "outcome unknown": the publish does not
    push its id to Redis. When the commit lands after all, Redis is rebuilt, so the message is not stranded."""
    import fcntl
    import os

    from app.errors import JournalUnavailable
    from app.models import NewMessage, QueueSettings
    from app.stores import journal_writer

    monkeypatch.setattr(journal_writer, "SUBMIT_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(journal_writer, "WATCH_SECONDS", 0.05)
    await broker.create_queue("late", QueueSettings(), "test")
    path = broker.journal.path
    peer = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)
    fcntl.flock(peer, fcntl.LOCK_EX)  # another process, stopped while it commits
    try:
        with pytest.raises(JournalUnavailable, match="unknown"):
            await broker.publish("late", [NewMessage(content='"late"')], "test")
    finally:
        fcntl.flock(peer, fcntl.LOCK_UN)
        os.close(peer)
    for _ in range(300):  # the commit lands; the watcher (every second) rebuilds Redis
        if broker.recovery.redis_up and (await broker.redis.snapshot("late")).ready:
            break
        await asyncio.sleep(0.02)
    [delivery] = await broker.consume("late", actor="test")
    assert delivery.message.content == '"late"'
    assert await broker.recovery.differences() == []
