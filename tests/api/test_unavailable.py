"""Fail closed and loud: a journal that cannot commit or a Redis that does not answer gives 503, never 201."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from tests.conftest import ApiClient, api_client
from tests.support import ADMIN_PASSWORD, JWT_SECRET, RedisProcess


async def test_a_journal_that_cannot_commit_gives_503_with_retry_after_and_red_readiness(
    client: ApiClient, broker: Any
) -> None:
    headers = await client.auth()
    await client.post("/queues", json={"name": "q"}, headers=headers)
    kept = (await client.post("/queues/q/messages", json={"content": "kept"}, headers=headers)).json()["message_id"]
    journal = broker.journal
    [(pages,)] = await journal.execute_on_writer("PRAGMA page_count")
    await journal.execute_on_writer(f"PRAGMA max_page_count = {pages}")  # the disk is now full for the journal

    big = "x" * 200_000
    failed = [await client.post("/queues/q/messages", json={"content": big}, headers=headers) for _ in range(3)]
    assert {r.status_code for r in failed} == {503}
    assert all(r.json()["code"] == "journal_unavailable" and r.headers["Retry-After"] for r in failed)
    ready = await client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["journal"] is False

    await journal.execute_on_writer("PRAGMA max_page_count = 1073741823")  # room again
    assert (await client.post("/queues/q/messages", json={"content": "after"}, headers=headers)).status_code == 201
    assert (await client.get("/health/ready")).status_code == 200
    delivered = (await client.post("/queues/q/messages/consume", json={"max": 10}, headers=headers)).json()
    assert [m["content"] for m in delivered["messages"]] == ["kept", "after"]
    assert delivered["messages"][0]["id"] == kept


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


async def test_when_redis_is_down_consume_and_publish_answer_503_and_recover_after(
    tmp_path: Path, own_redis: RedisProcess
) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=own_redis.url, admin_password=ADMIN_PASSWORD,
                        jwt_secret=JWT_SECRET, reaper_interval_seconds=0.1, redis_check_interval_seconds=0.1)
    async with api_client(settings) as (client, _):
        headers = await client.auth()
        await client.post("/queues", json={"name": "q"}, headers=headers)
        published = (await client.post("/queues/q/messages", json={"content": 1}, headers=headers)).json()
        own_redis.stop()
        consume = await client.get("/queues/q/messages/consume", headers=headers)
        assert consume.status_code == 503 and consume.json()["code"] == "redis_unavailable"
        assert consume.headers["Retry-After"]
        for _ in range(50):  # the watcher notices within a few checks
            if (await client.get("/health/ready")).status_code == 503:
                break
            await _sleep(0.1)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False
        refused = await client.post("/queues/q/messages", json={"content": 2}, headers=headers)
        assert refused.status_code == 503 and refused.json()["code"] == "redis_unavailable"

        own_redis.start()  # empty: the broker must rebuild it from the journal
        for _ in range(100):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await _sleep(0.1)
        delivery = (await client.get("/queues/q/messages/consume", headers=headers)).json()
        assert delivery["id"] == published["message_id"]
        assert (await client.get("/queues/q/messages/consume", headers=headers)).json() is None


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
