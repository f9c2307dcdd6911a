"""What the fault tests do to a broker over HTTP (publish storms, draining consumers) and how they look at it
from outside (`broker journal check`, the processes a broker left behind). Everything records into a History."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from app.stores.keys import EPOCH_KEY
from tests.faults.checker import History, Outcome
from tests.support import ADMIN_PASSWORD

REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
ROOT = Path(__file__).resolve().parents[2]


async def login(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
        response = await client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
        response.raise_for_status()
        return str(response.json()["access_token"])


def api(url: str, token: str, *, connections: int = 32) -> httpx.AsyncClient:
    """A client for one broker process (each start has its own port: build a new client after a restart)."""
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=REQUEST_TIMEOUT,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def create_queue(client: httpx.AsyncClient, name: str, **settings: Any) -> None:
    response = await client.post("/queues", json={"name": name, **settings})
    assert response.status_code == 201, response.text


async def queue_counts(client: httpx.AsyncClient, name: str) -> dict[str, int]:
    response = await client.get(f"/queues/{name}")
    assert response.status_code == 200, response.text
    return dict(response.json()["counts"])


async def publish(client: httpx.AsyncClient, queue: str, history: History, uid: str) -> Outcome:
    """One publish whose content carries its uid, recorded as invoked then completed."""
    history.invoke_publish(uid)
    try:
        response = await client.post(f"/queues/{queue}/messages", json={"content": {"uid": uid}})
    except httpx.HTTPError as exc:
        return history.complete_publish(uid, exc)
    return history.complete_publish(uid, response)


async def publish_many(client: httpx.AsyncClient, queue: str, history: History, count: int, *,
                       prefix: str = "p", workers: int = 8) -> None:
    """`count` publishes from `workers` concurrent publishers; every one must get 201 (no fault is running)."""
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            outcome = await publish(client, queue, history, f"{prefix}-{n}")
            assert outcome is Outcome.OK, f"publish {prefix}-{n}: {outcome} {history.statuses}"

    await asyncio.gather(*(worker() for _ in range(workers)))


async def storm(client: httpx.AsyncClient, queue: str, history: History, stop: asyncio.Event, *,
                workers: int = 8, prefix: str = "s") -> None:
    """Publish from `workers` concurrent publishers until `stop` is set. After an unknown outcome (the broker is
    gone or failing) a publisher backs off a little so a dead broker is not hammered by a hot loop."""
    counter = itertools.count()

    async def worker(w: int) -> None:
        while not stop.is_set():
            outcome = await publish(client, queue, history, f"{prefix}{w}-{next(counter)}")
            if outcome is not Outcome.OK:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def consume_batch(client: httpx.AsyncClient, queue: str, *, max_messages: int = 100, wait: float = 0.0,
                        **extra: Any) -> list[dict[str, Any]]:
    response = await client.post(f"/queues/{queue}/messages/consume",
                                 json={"max": max_messages, "wait": wait, **extra})
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def ack(client: httpx.AsyncClient, message_id: int, lease_id: str) -> httpx.Response:
    return await client.post(f"/messages/{message_id}/ack", json={"lease_id": lease_id})


async def drain(client: httpx.AsyncClient, queue: str, history: History, *, consumers: int = 1,
                within: float = 30.0, empty_rounds: int = 2, retry_503: bool = False,
                on_delivery: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Consume (max 100) and ack everything, from `consumers` concurrent consumers, each until it saw
    `empty_rounds` empty answers in a row. Every ack must get 200 (no fault is running while draining).
    With `retry_503`, a consume answered 503 is noted in `history.refused_consumes` and retried, as a client
    honouring Retry-After would (a 503 consume hands nothing out); otherwise it fails the drain."""
    deadline = time.monotonic() + within

    async def consumer() -> None:
        empty = 0
        while empty < empty_rounds:
            assert time.monotonic() < deadline, f"drain did not finish within {within}s"
            response = await client.post(f"/queues/{queue}/messages/consume", json={"max": 100, "wait": 0.2})
            if response.status_code == 503 and retry_503:
                history.refused_consumes.append(response.text)
                await asyncio.sleep(0.1)
                continue
            assert response.status_code == 200, response.text
            batch = list(response.json()["messages"])
            if not batch:
                empty += 1
                continue
            empty = 0
            delivered = []
            for item in batch:
                if on_delivery is not None:
                    on_delivery(item)
                delivered.append(history.deliver(item))
            answers = await asyncio.gather(*(ack(client, d.message_id, d.lease_id) for d in delivered))
            for d, answer in zip(delivered, answers, strict=True):
                assert history.ack(d, answer) is Outcome.OK, f"ack of {d}: {answer.status_code} {answer.text}"

    await asyncio.gather(*(consumer() for _ in range(consumers)))


async def consume_until(client: httpx.AsyncClient, queue: str, history: History, stop: asyncio.Event, *,
                        consumers: int = 4, max_messages: int = 10, hold_seconds: float = 0.0) -> None:
    """Consume and ack from `consumers` concurrent consumers until `stop` is set (a workload running while a
    fault happens). Consume answers other than 200 go to `history.refused_consumes`; acks are recorded as they
    come out (one refused while a fault runs is an outcome to check, not an error of the workload). Each consumer
    holds what it got for `hold_seconds` before acking, as if working on it, so leases are open when a fault hits."""

    async def consumer() -> None:
        while not stop.is_set():
            try:
                response = await client.post(f"/queues/{queue}/messages/consume",
                                             json={"max": max_messages, "wait": 0.2})
            except httpx.HTTPError as exc:
                history.refused_consumes.append(type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            if response.status_code != 200:
                history.refused_consumes.append(response.text)
                await asyncio.sleep(0.05)
                continue
            delivered = [history.deliver(item) for item in response.json()["messages"]]
            if delivered and hold_seconds:
                await asyncio.sleep(hold_seconds)
            results: list[httpx.Response | BaseException] = await asyncio.gather(
                *(ack(client, d.message_id, d.lease_id) for d in delivered), return_exceptions=True
            )
            for d, result in zip(delivered, results, strict=True):
                history.ack(d, result)

    await asyncio.gather(*(consumer() for _ in range(consumers)))


# -- looking from outside ---------------------------------------------------------------------------------------


def cli_env(data_dir: Path, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATA_DIR"] = str(data_dir)
    if redis_url:
        env["BROKER_REDIS_URL"] = redis_url
    return env


async def journal_check(data_dir: Path, redis_url: str | None, within: float = 30.0) -> tuple[int, str]:
    """`python -m app journal check`: its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "journal", "check",
        env=cli_env(data_dir, redis_url), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode()


async def settle(data_dir: Path, redis_url: str | None, within: float) -> tuple[int, str]:
    """Poll `journal check` until it exits 0 or `within` seconds passed; its last exit code and output."""
    deadline = time.monotonic() + within
    code, output = await journal_check(data_dir, redis_url)
    while code != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        code, output = await journal_check(data_dir, redis_url)
    return code, output


async def wait_consistent(data_dir: Path, redis_url: str | None, within: float = 20.0) -> str:
    """Poll `journal check` until it exits 0 (Redis rebuilt from the journal); fail with its last output."""
    code, output = await settle(data_dir, redis_url, within)
    assert code == 0, f"Redis not rebuilt within {within}s; journal check ({code}):\n{output}"
    return output


async def wait_rebuilt(redis_url: str, within: float = 20.0) -> None:
    """Wait until the broker has rebuilt a flushed Redis: it writes its epoch key last in a reconciliation, and
    FLUSHALL removed it. (Unlike `journal check`, this does not need Redis and the journal to agree exactly.)"""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + within
        while await client.get(EPOCH_KEY) is None:
            assert time.monotonic() < deadline, f"the broker did not rebuild Redis within {within}s"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def child_pids(pid: int, name: str) -> list[int]:
    """Live children of `pid` whose command name is `name` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[2] == pid and stat[0].startswith(name[:15]):
            found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped has stopped running: it does not count)."""
    stat = _stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None if it is gone."""
    try:
        raw = (Path("/proc") / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    state, ppid = raw[raw.rindex(")") + 2:].split()[:2]
    return comm, state, int(ppid)
