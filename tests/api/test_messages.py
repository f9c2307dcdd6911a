"""Publish, consume, ack and nack through the REST API, on real Redis and SQLite."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ApiClient


@pytest.fixture
async def admin(client: ApiClient) -> dict[str, str]:
    headers = await client.auth()
    created = await client.post("/queues", json={"name": "jobs", "visibility_timeout": 30}, headers=headers)
    assert created.status_code == 201
    return headers


async def publish(client: ApiClient, headers: dict[str, str], content: Any, queue: str = "jobs") -> int:
    response = await client.post(f"/queues/{queue}/messages", json={"content": content}, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "pending"
    return int(response.json()["message_id"])


async def test_content_of_any_json_type_round_trips_with_headers(client: ApiClient, admin: dict[str, str]) -> None:
    contents: list[Any] = ["text", 42, 1.5, None, True, [1, "two"], {"nested": {"a": [1, {"b": None}]}}, "ünï €"]
    for content in contents:
        await client.post("/queues/jobs/messages", json={"content": content, "headers": {"trace": "t1"}},
                          headers=admin)
    received = (await client.post("/queues/jobs/messages/consume", json={"max": 100}, headers=admin)).json()
    assert [m["content"] for m in received["messages"]] == contents
    assert all(m["headers"] == {"trace": "t1"} for m in received["messages"])


async def test_messages_are_delivered_oldest_first(client: ApiClient, admin: dict[str, str]) -> None:
    ids = [await publish(client, admin, n) for n in range(5)]
    got = [(await client.get("/queues/jobs/messages/consume", headers=admin)).json()["id"] for _ in ids]
    assert got == ids


async def test_a_delivery_carries_a_lease(client: ApiClient, admin: dict[str, str]) -> None:
    await publish(client, admin, "x")
    delivery = (await client.post("/queues/jobs/messages/consume", json={"visibility_timeout": 5},
                                  headers=admin)).json()["messages"][0]
    assert delivery["lease_id"] and delivery["lease_expires_at"].endswith("Z") and delivery["retrieved_at"]
    assert delivery["delivery_count"] == 1 and delivery["status"] == "processing"


async def test_batch_consume_returns_up_to_max_and_an_empty_list_when_none(
    client: ApiClient, admin: dict[str, str]
) -> None:
    for n in range(7):
        await publish(client, admin, n)
    first = (await client.post("/queues/jobs/messages/consume", json={"max": 5}, headers=admin)).json()
    second = (await client.post("/queues/jobs/messages/consume", json={"max": 5}, headers=admin)).json()
    third = (await client.post("/queues/jobs/messages/consume", headers=admin)).json()
    assert len(first["messages"]) == 5 and len(second["messages"]) == 2 and third == {"messages": []}


async def test_batch_publish_is_all_or_nothing_and_returns_ids_in_order(
    client: ApiClient, admin: dict[str, str]
) -> None:
    response = await client.post("/queues/jobs/messages/batch",
                                 json={"messages": [{"content": n} for n in range(100)]}, headers=admin)
    assert response.status_code == 201
    ids = response.json()["message_ids"]
    assert ids == sorted(ids) and len(set(ids)) == 100
    queue = (await client.get("/queues/jobs", headers=admin)).json()
    assert queue["counts"]["pending"] == 100 and queue["message_count"] == 100


async def test_ack_with_a_stale_lease_is_409_and_the_current_holder_can_still_ack(
    client: ApiClient, admin: dict[str, str]
) -> None:
    message_id = await publish(client, admin, "x")
    delivery = (await client.get("/queues/jobs/messages/consume", headers=admin)).json()
    stale = await client.post(f"/messages/{message_id}/ack", json={"lease_id": "not-the-lease"}, headers=admin)
    assert stale.status_code == 409 and stale.json()["code"] == "stale_lease"
    ok = await client.post(f"/messages/{message_id}/ack", json={"lease_id": delivery["lease_id"]}, headers=admin)
    assert ok.status_code == 200


async def test_ack_of_a_pending_message_is_409_not_processing(client: ApiClient, admin: dict[str, str]) -> None:
    message_id = await publish(client, admin, "x")
    response = await client.post(f"/messages/{message_id}/ack", headers=admin)
    assert response.status_code == 409 and response.json()["code"] == "not_processing"


async def test_nack_with_requeue_makes_it_pending_and_it_is_delivered_again(
    client: ApiClient, admin: dict[str, str]
) -> None:
    message_id = await publish(client, admin, "x")
    await client.get("/queues/jobs/messages/consume", headers=admin)
    nack = await client.post(f"/messages/{message_id}/nack?requeue=true", json={"reason": "busy"}, headers=admin)
    assert nack.status_code == 200 and nack.json()["status"] == "pending"
    again = (await client.get("/queues/jobs/messages/consume", headers=admin)).json()
    assert again["id"] == message_id and again["delivery_count"] == 2 and again["last_error"] == "busy"


async def test_nack_without_requeue_fails_the_message_with_its_reason(
    client: ApiClient, admin: dict[str, str]
) -> None:
    message_id = await publish(client, admin, "x")
    await client.get("/queues/jobs/messages/consume", headers=admin)
    nack = await client.post(f"/messages/{message_id}/nack", json={"reason": "bad input"}, headers=admin)
    assert nack.status_code == 200 and nack.json()["status"] == "failed"
    message = (await client.get(f"/messages/{message_id}", headers=admin)).json()
    assert message["status"] == "failed" and message["last_error"] == "bad input"
    assert (await client.get("/queues/jobs/messages/consume", headers=admin)).json() is None
    history = (await client.get(f"/messages/{message_id}/history", headers=admin)).json()["events"]
    assert [e["type"] for e in history] == ["message.published", "message.delivered", "message.nacked"]


async def test_requeue_past_max_deliveries_fails_the_message_with_every_delivery_in_its_history(
    client: ApiClient, admin: dict[str, str]
) -> None:
    await client.post("/queues", json={"name": "few", "max_deliveries": 3}, headers=admin)
    message_id = await publish(client, admin, "x", queue="few")
    statuses = []
    for _ in range(3):
        delivery = (await client.get("/queues/few/messages/consume", headers=admin)).json()
        assert delivery["id"] == message_id
        nack = await client.post(f"/messages/{message_id}/nack", json={"requeue": True, "reason": "flaky"},
                                 headers=admin)
        statuses.append(nack.json()["status"])
    assert statuses == ["pending", "pending", "failed"]
    message = (await client.get(f"/messages/{message_id}", headers=admin)).json()
    assert message["status"] == "failed" and "delivery limit of 3" in message["last_error"]
    events = [e["type"] for e in (await client.get(f"/messages/{message_id}/history", headers=admin)).json()["events"]]
    assert events.count("message.delivered") == 3 and events[-1] == "message.failed"


async def test_an_unacked_delivery_is_redelivered_after_its_lease_expires(
    client: ApiClient, admin: dict[str, str]
) -> None:
    message_id = await publish(client, admin, "x")
    first = (await client.post("/queues/jobs/messages/consume", json={"visibility_timeout": 0.3},
                               headers=admin)).json()["messages"][0]
    assert (await client.get("/queues/jobs/messages/consume", headers=admin)).json() is None
    second = (await client.get("/queues/jobs/messages/consume?wait=5", headers=admin)).json()
    assert second["id"] == message_id and second["delivery_count"] == 2 and second["lease_id"] != first["lease_id"]
    late = await client.post(f"/messages/{message_id}/ack", json={"lease_id": first["lease_id"]}, headers=admin)
    assert late.status_code == 409 and late.json()["code"] == "stale_lease"
    events = [e["type"] for e in (await client.get(f"/messages/{message_id}/history", headers=admin)).json()["events"]]
    assert events == ["message.published", "message.delivered", "message.lease_expired", "message.delivered"]


async def test_a_long_poll_returns_a_message_published_while_it_waits(
    client: ApiClient, admin: dict[str, str]
) -> None:
    waiter = asyncio.create_task(client.get("/queues/jobs/messages/consume?wait=10", headers=admin))
    await asyncio.sleep(0.3)
    message_id = await publish(client, admin, "late")
    response = await asyncio.wait_for(waiter, 5)
    assert response.json()["id"] == message_id


async def test_sixteen_concurrent_consumers_drain_2000_messages_each_exactly_once(
    client: ApiClient, admin: dict[str, str]
) -> None:
    published: list[int] = []
    for start in range(0, 2000, 500):
        batch = [{"content": n} for n in range(start, start + 500)]
        published += (await client.post("/queues/jobs/messages/batch", json={"messages": batch},
                                        headers=admin)).json()["message_ids"]
    received: list[int] = []

    async def consumer() -> None:
        while True:
            response = await client.post("/queues/jobs/messages/consume", json={"max": 10}, headers=admin)
            messages = response.json()["messages"]
            if not messages:
                return
            for m in messages:
                received.append(m["id"])
                ack = await client.post(f"/messages/{m['id']}/ack", json={"lease_id": m["lease_id"]}, headers=admin)
                assert ack.status_code == 200

    await asyncio.gather(*(consumer() for _ in range(16)))
    assert len(received) == 2000 and sorted(received) == sorted(published)
    queue = (await client.get("/queues/jobs", headers=admin)).json()
    assert queue["counts"]["processed"] == 2000 and queue["counts"]["pending"] == 0


async def test_concurrent_publishes_share_journal_commits(
    client: ApiClient, admin: dict[str, str], broker: Any
) -> None:
    before = broker.journal.stats.commits
    ids = await asyncio.gather(*(publish(client, admin, n) for n in range(200)))
    commits = broker.journal.stats.commits - before
    assert len(set(ids)) == 200
    assert commits < 200, f"{commits} commits for 200 concurrent publishes: no group commit"


async def test_purge_removes_pending_messages_but_not_those_being_processed(
    client: ApiClient, admin: dict[str, str]
) -> None:
    for n in range(5):
        await publish(client, admin, n)
    held = (await client.get("/queues/jobs/messages/consume", headers=admin)).json()
    purged = await client.post("/queues/jobs/purge", headers=admin)
    assert purged.status_code == 200 and purged.json() == {"purged": 4}
    assert (await client.get("/queues/jobs/messages/consume", headers=admin)).json() is None
    assert (await client.post(f"/messages/{held['id']}/ack", headers=admin)).status_code == 200


async def test_deleting_a_queue_deletes_its_messages(client: ApiClient, admin: dict[str, str]) -> None:
    message_id = await publish(client, admin, "x")
    assert (await client.delete("/queues/jobs", headers=admin)).status_code == 204
    assert (await client.get("/queues/jobs", headers=admin)).status_code == 404
    assert (await client.get(f"/messages/{message_id}", headers=admin)).status_code == 404
    assert (await client.post("/queues", json={"name": "jobs"}, headers=admin)).status_code == 201
    assert (await client.get("/queues/jobs/messages/consume", headers=admin)).json() is None


async def test_patch_changes_settings_and_list_is_sorted_by_name(client: ApiClient, admin: dict[str, str]) -> None:
    patched = await client.patch("/queues/jobs", json={"visibility_timeout": 5, "max_deliveries": 2}, headers=admin)
    assert patched.status_code == 200
    assert patched.json()["settings"]["visibility_timeout"] == 5 and patched.json()["settings"]["max_deliveries"] == 2
    await client.post("/queues", json={"name": "alpha"}, headers=admin)
    assert [q["name"] for q in (await client.get("/queues", headers=admin)).json()] == ["alpha", "jobs"]


async def test_browsing_pages_by_status_and_changes_nothing(client: ApiClient, admin: dict[str, str]) -> None:
    ids = [await publish(client, admin, n) for n in range(5)]
    page = (await client.get("/queues/jobs/messages?status=pending&limit=3", headers=admin)).json()
    assert [m["id"] for m in page["messages"]] == ids[:3] and page["next_after_id"] == ids[2]
    rest = (await client.get(f"/queues/jobs/messages?after_id={ids[2]}", headers=admin)).json()
    assert [m["id"] for m in rest["messages"]] == ids[3:] and rest["next_after_id"] is None
    assert (await client.get("/queues/jobs", headers=admin)).json()["counts"]["pending"] == 5


async def test_queue_counts_and_oldest_pending_age(client: ApiClient, admin: dict[str, str]) -> None:
    await publish(client, admin, 1)
    await publish(client, admin, 2)
    await client.get("/queues/jobs/messages/consume", headers=admin)
    queue = (await client.get("/queues/jobs", headers=admin)).json()
    assert queue["counts"] == {"pending": 1, "delayed": 0, "processing": 1, "processed": 0, "failed": 0}
    assert queue["oldest_pending_age_seconds"] >= 0 and queue["message_count"] == 2


async def test_a_long_poll_of_several_seconds_on_an_empty_queue_answers_null(
    client: ApiClient, admin: dict[str, str]
) -> None:
    response = await client.get("/queues/jobs/messages/consume?wait=6", headers=admin)  # past the 5 s socket timeout
    assert response.status_code == 200 and response.json() is None
    many = await client.post("/queues/jobs/messages/consume", json={"wait": 5.5}, headers=admin)
    assert many.status_code == 200 and many.json() == {"messages": []}
