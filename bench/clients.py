"""aiohttp load for what wrk does not drive: prefilling a queue, and publish-to-delivery latency of long-polling
consumers (its publisher and consumers share one clock).

Each function is a coroutine bounded in time; the runner calls them with `run()` (a uvloop event loop when uvloop
is installed, as the broker's own loop is). The client's own CPU use is reported with each result: on a 2-core
machine a client near one full core is itself a limit, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")
PREFILL_TIMEOUT = 300.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _session(token: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"},
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=60),
        json_serialize=lambda value: orjson.dumps(value).decode(),
    )


class _CpuClock:
    """This process's CPU seconds over wall seconds, between start and stop."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.wall = time.perf_counter()

    def share(self) -> float:
        wall = time.perf_counter() - self.wall
        return (time.process_time() - self.cpu) / wall if wall > 0 else 0.0


# -- prefill ------------------------------------------------------------------------------------------------------


async def prefill(base_url: str, token: str, queue: str, count: int, *, batch: int = 1000,
                  concurrency: int = 4) -> float:
    """Publish `count` small messages to `queue` in batches; returns the seconds it took."""
    started = time.perf_counter()
    url = f"{base_url}/queues/{queue}/messages/batch"
    sizes = [batch] * (count // batch) + ([count % batch] if count % batch else [])
    pending = list(enumerate(sizes))

    async def worker(session: aiohttp.ClientSession) -> None:
        while pending:
            index, size = pending.pop()
            body = {"messages": [{"content": {"task": "consume", "batch": index, "n": n}} for n in range(size)]}
            async with session.post(url, data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json"}) as response:
                if response.status != 201:
                    raise RuntimeError(f"prefill of {queue}: {response.status} {await response.text()}")

    async with _session(token, concurrency) as session, asyncio.timeout(PREFILL_TIMEOUT):
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started


# -- publish-to-delivery latency ----------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    samples: list[float] = field(default_factory=list)  # milliseconds, publish sent -> delivery received
    published: int = 0
    lost: int = 0  # published but not delivered before the deadline
    errors: int = 0
    client_cpu: float = 0.0

    @property
    def p50_ms(self) -> float:
        return _percentiles(self.samples)[0]

    @property
    def p99_ms(self) -> float:
        return _percentiles(self.samples)[1]


async def longpoll_latency(base_url: str, token: str, queue: str, *, samples: int = 300, interval: float = 0.02,
                           consumers: int = 4, warmup: int = 10, wait: int = 20) -> LatencyResult:
    """Consumers long-poll `GET .../consume?wait=20`; a publisher publishes one message every `interval` seconds
    with its send time (perf_counter, one clock: same process) in the content. Latency = time the consumer got
    the delivery - time the publisher sent the publish; it includes the publish's durable commit, the Redis hand-off
    to the blocked consumer, the delivery's journal record and both HTTP round trips. Each delivery is acked.
    The first `warmup` messages are not counted. At the end, one stop message per consumer ends its long-poll."""
    result = LatencyResult()
    total = samples + warmup
    received: set[int] = set()
    all_received = asyncio.Event()
    consume_url = f"{base_url}/queues/{queue}/messages/consume?wait={wait}"
    publish_url = f"{base_url}/queues/{queue}/messages"

    async def consumer(session: aiohttp.ClientSession) -> None:
        while True:
            async with session.get(consume_url) as response:
                body = await response.read()
            now = time.perf_counter()
            if response.status != 200:
                result.errors += 1
                await asyncio.sleep(0.01)
                continue
            delivery = orjson.loads(body)
            if delivery is None:
                continue
            content = delivery["content"]
            async with session.post(f"{base_url}/messages/{delivery['id']}/ack",
                                    data=orjson.dumps({"lease_id": delivery["lease_id"]}),
                                    headers={"Content-Type": "application/json"}) as ack:
                await ack.read()
                if ack.status != 200:
                    result.errors += 1
            if content.get("stop"):
                return
            index = int(content["i"])
            if index >= warmup and index not in received:
                result.samples.append((now - float(content["sent"])) * 1000)
            received.add(index)
            if len(received) >= total:
                all_received.set()

    async def publish(session: aiohttp.ClientSession, content: dict[str, Any]) -> None:
        async with session.post(publish_url, data=orjson.dumps({"content": content}),
                                headers={"Content-Type": "application/json"}) as response:
            await response.read()
            if response.status != 201:
                result.errors += 1

    async with _session(token, consumers) as consuming, _session(token, 8) as publishing:
        clock = _CpuClock()
        tasks = [asyncio.create_task(consumer(consuming)) for _ in range(consumers)]
        await asyncio.sleep(0.3)  # the consumers' long-polls are waiting before the first publish
        sends: list[asyncio.Task[None]] = []
        next_at = time.perf_counter()
        for i in range(total):
            sends.append(asyncio.create_task(publish(publishing, {"i": i, "sent": time.perf_counter()})))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        result.published = samples
        await asyncio.gather(*sends)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_received.wait(), 10)
        result.lost = total - len(received)
        for _ in range(consumers):
            await publish(publishing, {"stop": True})
        done, running = await asyncio.wait(tasks, timeout=wait + 5)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                result.errors += 1
        result.client_cpu = clock.share()
    return result


def _percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) of `values`, 0 when empty; p99 by the nearest-rank method."""
    if not values:
        return 0.0, 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1))
    return statistics.median(ordered), ordered[rank]
