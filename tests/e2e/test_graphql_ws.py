"""GraphQL subscriptions over a real uvicorn (graphql-transport-ws): the same events as SSE, with `since` replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.support import BrokerProcess, token

pytestmark = pytest.mark.slow

EVENT_FIELDS = "seq ts type queue messageId actor data"
EVENTS = f"subscription($q: String, $types: [String!], $since: Long) {{ events(queue: $q, types: $types, " \
         f"since: $since) {{ {EVENT_FIELDS} }} }}"
GUARD_SECONDS = 20  # only so that a broken stream fails the test instead of hanging it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    process = BrokerProcess(Path(tmp_path_factory.mktemp("graphql")) / "data", redis_url=None).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def admin_token(server: BrokerProcess) -> str:
    return token(server.url)


def snake(data: Any) -> Any:
    if isinstance(data, dict):
        return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): v for k, v in data.items()}
    return data


async def gql(server: BrokerProcess, admin_token: str, query: str, **variables: Any) -> Any:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as client:
        response = await client.post("/graphql", json={"query": query, "variables": variables})
    body = response.json()
    assert response.status_code == 200 and "errors" not in body, body
    return body["data"]


class Subscription:
    """One graphql-transport-ws connection carrying one subscription."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.early: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(GUARD_SECONDS):
            message: dict[str, Any] = json.loads(await self.ws.recv())
        return message

    async def start(self, query: str, **variables: Any) -> None:
        """Subscribe, then ping: the server handles a connection's messages in order, so at its pong the
        subscription's starting point is fixed, and every event committed from then on will be delivered."""
        await self.ws.send(json.dumps({"id": "1", "type": "subscribe",
                                       "payload": {"query": query, "variables": variables}}))
        await self.ws.send(json.dumps({"type": "ping"}))
        while (message := await self.receive())["type"] != "pong":
            self.early.append(message)

    async def events_until(self, seq: int) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while not events or events[-1]["seq"] < seq:
            message = self.early.pop(0) if self.early else await self.receive()
            assert message["type"] == "next" and message["id"] == "1", message
            events.append(message["payload"]["data"]["events"])
        return events


@contextlib.asynccontextmanager
async def subscription(server: BrokerProcess, payload: dict[str, Any] | None) -> AsyncIterator[Subscription]:
    url = server.url.replace("http", "ws", 1) + "/graphql"
    async with connect(url, subprotocols=[Subprotocol("graphql-transport-ws")], proxy=None) as ws:
        assert ws.subprotocol == "graphql-transport-ws"
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        sub = Subscription(ws)
        assert await sub.receive() == {"type": "connection_ack"}
        yield sub


async def sse_events(server: BrokerProcess, admin_token: str, path: str, until_seq: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with asyncio.timeout(GUARD_SECONDS), httpx.AsyncClient(base_url=server.url, headers=headers) as client, \
            client.stream("GET", path) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
                if events[-1]["seq"] >= until_seq:
                    return events
    raise AssertionError(f"the SSE stream ended before seq {until_seq}: {events}")


async def until_subscribers(server: BrokerProcess, count: int) -> None:
    """Wait for the hub to count `count` subscribers (it drives the broker_sse_clients gauge)."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        for _ in range(GUARD_SECONDS * 20):
            if f"broker_sse_clients {count:.1f}" in (await client.get("/metrics")).text:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the hub never had {count} subscribers")


async def work_on(server: BrokerProcess, admin_token: str, queue: str) -> int:
    """Publish, consume, ack, nack with requeue, consume again, extend, ack; the seq of the last event."""
    publish = 'mutation($q: String!, $c: JSON) { publish(queue: $q, content: $c, headers: {k: "v"}) { messageId } }'
    for content in ({"n": 1}, "two"):
        await gql(server, admin_token, publish, q=queue, c=content)
    consume = "mutation($q: String!) { consume(queue: $q, max: 2) { id leaseId } }"
    first, second = (await gql(server, admin_token, consume, q=queue))["consume"]
    await gql(server, admin_token, "mutation($id: Long!, $l: String) { ack(messageId: $id, leaseId: $l) "
                                   "{ status } }", id=first["id"], l=first["leaseId"])
    await gql(server, admin_token, "mutation($id: Long!, $l: String) { nack(messageId: $id, leaseId: $l, "
                                   'requeue: true, reason: "retry") { status } }', id=second["id"], l=second["leaseId"])
    [again] = (await gql(server, admin_token, consume, q=queue))["consume"]
    await gql(server, admin_token, "mutation($id: Long!) { extendLease(messageId: $id, visibilityTimeout: 60) "
                                   "{ leaseExpiresAt } }", id=again["id"])
    await gql(server, admin_token, "mutation($id: Long!) { ack(messageId: $id) { status } }", id=again["id"])
    history = await gql(server, admin_token, "query($id: Long!) { messageHistory(id: $id) { seq } }", id=again["id"])
    return int(history["messageHistory"][-1]["seq"])


async def test_a_subscription_receives_the_same_events_as_sse(server: BrokerProcess, admin_token: str) -> None:
    await gql(server, admin_token, 'mutation { createQueue(name: "live") { id } }')
    auth = {"Authorization": f"Bearer {admin_token}"}
    async with subscription(server, auth) as live, subscription(server, auth) as everything:
        await live.start(EVENTS, q="live")
        await everything.start(EVENTS)
        last = await work_on(server, admin_token, "live")
        received = [snake(e) for e in await live.events_until(last)]
        assert [e["seq"] for e in await everything.events_until(last)] == [e["seq"] for e in received]

    await until_subscribers(server, 0)  # closed connections release their subscriptions
    assert received[0]["type"] == "message.published", "it started after the queue was created"
    types = {e["type"] for e in received}
    assert {"message.published", "message.delivered", "message.acked", "message.nacked"} <= types
    sse = await sse_events(server, admin_token, f"/queues/live/events?since={received[0]['seq'] - 1}", last)
    assert received == sse


async def test_since_replays_then_continues_live_and_types_filter(server: BrokerProcess, admin_token: str) -> None:
    await gql(server, admin_token, 'mutation { createQueue(name: "replay") { id } }')
    last = await work_on(server, admin_token, "replay")
    sse = await sse_events(server, admin_token, "/queues/replay/events?since=0", last)
    acked = await sse_events(server, admin_token, "/queues/replay/events?since=0&types=message.acked", last)
    assert sse[0]["type"] == "queue.created" and len(acked) == 2

    auth = {"Authorization": f"Bearer {admin_token}"}
    async with subscription(server, auth) as replay, subscription(server, auth) as only_acks:
        await replay.start(EVENTS, q="replay", since=0)
        await only_acks.start(EVENTS, q="replay", types=["message.acked"], since=0)
        assert [snake(e) for e in await replay.events_until(last)] == sse
        assert [snake(e) for e in await only_acks.events_until(last)] == acked

        published = await gql(server, admin_token, 'mutation { publish(queue: "replay", content: 3) { messageId } }')
        [after] = await replay.events_until(last + 1)
        assert after["type"] == "message.published" and after["messageId"] == published["publish"]["messageId"]

    resumed = sse[len(sse) // 2]["seq"]
    async with subscription(server, auth) as resume:
        await resume.start(EVENTS, q="replay", since=resumed)
        assert [snake(e) for e in await resume.events_until(last)] == [e for e in sse if e["seq"] > resumed]


@pytest.mark.parametrize("payload", [None, {}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "x"}])
async def test_a_connection_without_a_valid_token_is_closed_with_4403(
    server: BrokerProcess, payload: dict[str, Any] | None
) -> None:
    url = server.url.replace("http", "ws", 1) + "/graphql"
    async with connect(url, subprotocols=[Subprotocol("graphql-transport-ws")], proxy=None) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(GUARD_SECONDS):
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


async def test_the_handshake_header_authenticates_and_a_bad_subscription_is_an_error(
    server: BrokerProcess, admin_token: str
) -> None:
    url = server.url.replace("http", "ws", 1) + "/graphql"
    async with connect(url, subprotocols=[Subprotocol("graphql-transport-ws")], proxy=None,
                       additional_headers={"Authorization": f"Bearer {admin_token}"}) as ws:
        await ws.send(json.dumps({"type": "connection_init"}))
        sub = Subscription(ws)
        assert await sub.receive() == {"type": "connection_ack"}
        for n, (variables, code) in enumerate([({"q": "no-such-queue"}, "queue_not_found"),
                                              ({"types": ["message.nope"]}, "validation_error"),
                                              ({"since": -1}, "validation_error")]):
            await ws.send(json.dumps({"id": str(n), "type": "subscribe",
                                      "payload": {"query": EVENTS, "variables": variables}}))
            error = await sub.receive()
            assert error["type"] == "error" and error["id"] == str(n), error
            assert [e["extensions"]["code"] for e in error["payload"]] == [code]


async def test_subscriptions_count_against_the_per_user_stream_cap_shared_with_sse(
    server: BrokerProcess, admin_token: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as client:
        created = await client.post("/users", json={"username": "watcher", "password": "password-1",
                                                    "roles": ["consumer"]})
        assert created.status_code == 201
    watcher = {"Authorization": f"Bearer {token(server.url, 'watcher', 'password-1')}"}
    cap = 20  # BROKER_SSE_MAX_STREAMS_PER_USER's default
    async with subscription(server, watcher) as sub:
        for n in range(cap):
            await sub.ws.send(json.dumps({"id": f"s{n}", "type": "subscribe", "payload": {"query": EVENTS}}))
        await until_subscribers(server, cap)
        await sub.ws.send(json.dumps({"id": "over", "type": "subscribe", "payload": {"query": EVENTS}}))
        error = await sub.receive()
        assert error["type"] == "error" and error["id"] == "over"
        assert error["payload"][0]["extensions"] == {"code": "too_many_streams", "retryAfter": 5}
        async with httpx.AsyncClient(base_url=server.url, headers=watcher) as client:
            assert (await client.get("/events")).json()["code"] == "too_many_streams"
    await until_subscribers(server, 0)
