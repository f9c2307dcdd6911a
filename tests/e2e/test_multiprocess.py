"""Several broker processes on one journal and one Redis never hand one lease to two consumers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support import BrokerProcess, RedisProcess, token

pytestmark = pytest.mark.slow
MESSAGES = 2000
CONSUMERS = 16


async def drain(urls: list[str], headers: dict[str, str], queue: str) -> list[int]:
    received: list[int] = []

    async def consumer(client: httpx.AsyncClient) -> None:
        while True:
            response = await client.post(f"/queues/{queue}/messages/consume", json={"max": 10}, headers=headers)
            assert response.status_code == 200, response.text
            messages = response.json()["messages"]
            if not messages:
                return
            for m in messages:
                received.append(m["id"])
                ack = await client.post(f"/messages/{m['id']}/ack", json={"lease_id": m["lease_id"]},
                                        headers=headers)
                assert ack.status_code == 200, ack.text

    clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
    try:
        await asyncio.gather(*(consumer(clients[i % len(clients)]) for i in range(CONSUMERS)))
    finally:
        for client in clients:
            await client.aclose()
    return received


def metric(text: str, name: str, labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"{name}{{") and labels in line)


async def publish_all(urls: list[str], headers: dict[str, str], queue: str) -> list[int]:
    ids: list[int] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for start in range(0, MESSAGES, 250):
            url = urls[(start // 250) % len(urls)]
            batch = {"messages": [{"content": n} for n in range(start, start + 250)]}
            response = await client.post(f"{url}/queues/{queue}/messages/batch", json=batch, headers=headers)
            assert response.status_code == 201, response.text
            ids += response.json()["message_ids"]
    return ids


async def test_two_broker_processes_sharing_journal_and_redis_deliver_each_message_once(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis").start()
    data = tmp_path / "data"
    first = BrokerProcess(data, redis_url=redis.url).start()
    second = BrokerProcess(data, redis_url=redis.url).start()
    try:
        urls = [first.url, second.url]
        headers = {"Authorization": f"Bearer {token(first.url)}"}
        async with httpx.AsyncClient() as client:
            created = await client.post(f"{first.url}/queues", json={"name": "shared"}, headers=headers)
            assert created.status_code == 201
            # the second process learns of the queue another process created
            assert (await client.get(f"{second.url}/queues/shared", headers=headers)).status_code == 200
        published = await publish_all(urls, headers, "shared")
        assert len(set(published)) == MESSAGES
        received = await drain(urls, headers, "shared")
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert sorted(received) == sorted(published)
        async with httpx.AsyncClient() as client:
            for url in urls:
                counts = (await client.get(f"{url}/queues/shared", headers=headers)).json()["counts"]
                assert counts["processed"] == MESSAGES and counts["pending"] == counts["processing"] == 0
    finally:
        first.stop()
        second.stop()
        redis.stop()


async def test_one_broker_with_two_workers_delivers_each_message_once(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", redis_url=None, extra_env={"BROKER_WORKERS": "2"}).start()
    try:
        headers = {"Authorization": f"Bearer {token(broker.url)}"}
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"{broker.url}/queues", json={"name": "w"}, headers=headers)).status_code == 201
        published = await publish_all([broker.url], headers, "w")
        received = await drain([broker.url], headers, "w")
        assert len(received) == len(set(received)) == MESSAGES
        assert sorted(received) == sorted(published)
        async with httpx.AsyncClient() as client:
            for _ in range(4):  # whichever worker answers a scrape, it reports every worker's counts
                text = (await client.get(f"{broker.url}/metrics")).text
                assert metric(text, "broker_messages_published_total", 'queue="w"') == MESSAGES
                assert metric(text, "broker_messages_acked_total", 'queue="w"') == MESSAGES
        assert broker.terminate()
    finally:
        broker.stop()
