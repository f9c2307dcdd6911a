"""Server-sent events through a real uvicorn: order, gap-free replay, idle clients, slow clients."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from tests.support import BrokerProcess, token

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    process = BrokerProcess(tmp_path / "data", redis_url=None,
                            extra_env={"BROKER_SSE_BUFFER_EVENTS": "200", "BROKER_LOG_LEVEL": "warning"}).start()
    yield process
    process.stop()


async def frames(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE stream into {"id", "event", "data"} frames (comments and pings skipped)."""
    frame: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in frame:
                frame["data"] = orjson.loads(frame["data"])
                yield frame
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            frame[key] = value.removeprefix(" ")


async def collect(client: httpx.AsyncClient, url: str, headers: dict[str, str], count: int,
                  ready: asyncio.Event | None = None) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        if ready is not None:
            ready.set()
        async for frame in frames(response):
            got.append(frame)
            if len(got) == count:
                break
    return got


async def test_a_queue_stream_shows_publish_delivery_and_ack_in_order(broker: Any) -> None:
    headers = {"Authorization": f"Bearer {token(broker.url)}"}
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        await client.post("/queues", json={"name": "live"}, headers=headers)
        ready = asyncio.Event()
        watcher = asyncio.create_task(collect(client, "/queues/live/events", headers, 3, ready))
        await ready.wait()
        await asyncio.sleep(0.2)
        message_id = (await client.post("/queues/live/messages", json={"content": 1}, headers=headers)).json()[
            "message_id"]
        delivery = (await client.get("/queues/live/messages/consume", headers=headers)).json()
        await client.post(f"/messages/{message_id}/ack", json={"lease_id": delivery["lease_id"]}, headers=headers)
        got = await asyncio.wait_for(watcher, 15)
    assert [f["event"] for f in got] == ["message.published", "message.delivered", "message.acked"]
    assert all(f["data"]["message_id"] == message_id and f["data"]["queue"] == "live" for f in got)
    seqs = [int(f["id"]) for f in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and [f["data"]["seq"] for f in got] == seqs


async def test_a_client_that_reconnects_with_last_event_id_gets_exactly_what_it_missed_then_live(
    broker: Any,
) -> None:
    headers = {"Authorization": f"Bearer {token(broker.url)}"}
    async with httpx.AsyncClient(base_url=broker.url, timeout=30) as client:
        await client.post("/queues", json={"name": "gap"}, headers=headers)
        first = await client.post("/queues/gap/messages", json={"content": "before"}, headers=headers)
        assert first.status_code == 201
        created, published = await collect(client, "/queues/gap/events?since=0", headers, 2)
        assert created["event"] == "queue.created" and published["data"]["message_id"] == first.json()["message_id"]
        last_id = int(published["id"])

        missed = []
        for start in range(0, 500, 100):  # 500 events while disconnected
            batch = {"messages": [{"content": n} for n in range(start, start + 100)]}
            missed += (await client.post("/queues/gap/messages/batch", json=batch, headers=headers)).json()[
                "message_ids"]

        async def keep_publishing() -> list[int]:
            ids = []
            for n in range(50):  # concurrent with the switch from replay to live
                response = await client.post("/queues/gap/messages", json={"content": f"live {n}"}, headers=headers)
                ids.append(response.json()["message_id"])
                await asyncio.sleep(0.01)
            return ids

        publisher = asyncio.create_task(keep_publishing())
        got = await asyncio.wait_for(
            collect(client, "/queues/gap/events", {**headers, "Last-Event-ID": str(last_id)}, 550), 30)
        live = await publisher
    seqs = [int(f["id"]) for f in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 550, "a repeat or an out-of-order frame"
    assert seqs[0] == last_id + 1 and seqs[-1] - seqs[0] == 549, "a gap"
    assert [f["data"]["message_id"] for f in got] == missed + live


async def test_two_hundred_idle_clients_stay_cheap_and_a_client_that_stops_reading_is_dropped(broker: Any) -> None:
    headers = {"Authorization": f"Bearer {token(broker.url)}"}
    assert broker.process is not None
    process = psutil.Process(broker.process.pid)
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=broker.url, timeout=60, limits=limits) as client:
        await client.post("/queues", json={"name": "idle"}, headers=headers)
        rss_before = process.memory_info().rss
        streams = []
        users = []  # the per-user cap is 20 streams: 200 streams come from 10 users
        for n in range(10):
            name = f"w{n}"
            await client.post("/users", json={"username": name, "password": "password-1", "roles": ["consumer"]},
                              headers=headers)
            users.append({"Authorization": f"Bearer {token(broker.url, name, 'password-1')}"})
        for n in range(200):
            context = client.stream("GET", "/events?queue=idle", headers=users[n % 10])
            streams.append((context, await context.__aenter__()))
        assert all(r.status_code == 200 for _, r in streams)
        over = await client.get("/events", headers=users[0], timeout=5)
        assert over.status_code == 429 and over.json()["code"] == "too_many_streams"

        # A client that never reads: a raw socket that sends the request and then nothing.
        sock = socket.create_connection(("127.0.0.1", broker.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /queues/idle/events HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}"
                     "\r\n\r\n".encode())
        await asyncio.sleep(0.5)
        gauge_before = await sse_clients(client)
        assert gauge_before == 201

        for _ in range(40):  # 20,000 events: the idle streams take them, the stalled one falls behind
            batch = {"messages": [{"content": "x" * 200} for _ in range(500)]}
            assert (await client.post("/queues/idle/messages/batch", json=batch, headers=headers)).status_code == 201
        for _ in range(100):
            if await sse_clients(client) <= 200:
                break
            await asyncio.sleep(0.2)
        assert await sse_clients(client) <= 200, "the client that stopped reading was not dropped"
        rss_after = process.memory_info().rss
        assert rss_after - rss_before < 150 * 1024 * 1024, f"RSS grew {(rss_after - rss_before) >> 20} MiB"
        sock.close()
        for context, _ in streams:
            await context.__aexit__(None, None, None)


async def sse_clients(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    [line] = [line for line in text.splitlines() if line.startswith("broker_sse_clients ")]
    return float(line.split()[1])


async def test_events_stream_over_tls_with_the_self_signed_certificate(tmp_path: Path) -> None:
    import ssl

    process = BrokerProcess(tmp_path / "data", redis_url=None, extra_env={"BROKER_TLS": "self-signed"}).start()
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "data" / "tls" / "cert.pem"))
        async with httpx.AsyncClient(base_url=process.url, timeout=30, verify=context) as client:
            login = await client.post("/login", data={"username": "admin", "password": "admin-password"})
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
            await client.post("/queues", json={"name": "tls"}, headers=headers)
            await client.post("/queues/tls/messages", json={"content": 1}, headers=headers)
            got = await asyncio.wait_for(collect(client, "/queues/tls/events?since=0", headers, 2), 15)
        assert [f["event"] for f in got] == ["queue.created", "message.published"]
    finally:
        process.stop()


async def test_a_stream_on_one_broker_process_sees_what_another_process_journaled(tmp_path: Path) -> None:
    from tests.support import RedisProcess

    redis = RedisProcess(tmp_path / "redis").start()
    first = BrokerProcess(tmp_path / "data", redis_url=redis.url).start()
    second = BrokerProcess(tmp_path / "data", redis_url=redis.url).start()
    try:
        headers = {"Authorization": f"Bearer {token(first.url)}"}
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(f"{first.url}/queues", json={"name": "across"}, headers=headers)
            ready = asyncio.Event()
            watcher = asyncio.create_task(collect(client, f"{second.url}/queues/across/events", headers, 3, ready))
            await ready.wait()
            await asyncio.sleep(0.2)
            for n in range(3):  # published through the other process
                response = await client.post(f"{first.url}/queues/across/messages", json={"content": n},
                                             headers=headers)
                assert response.status_code == 201
            got = await asyncio.wait_for(watcher, 15)
        assert [f["event"] for f in got] == ["message.published"] * 3
        assert [f["data"]["queue"] for f in got] == ["across"] * 3
    finally:
        first.stop()
        second.stop()
        redis.stop()
