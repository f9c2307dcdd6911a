"""The hand-off index in Redis: per queue a ready list, a processing list, and a leases sorted set of ids.

Redis holds ids only and may be lost at any time; the journal decides. Where a fault could leave an id either
missing or duplicated, this store errs towards the duplicate: the journal refuses a stale copy at delivery time,
while a missing id would strand work until the next reconciliation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from app.errors import RedisUnavailable
from app.stores import keys
from app.stores.pipeliner import Pipeliner

REBUILD_CHUNK = 10_000
_SCRIPTS = ("take", "release", "requeue", "reap", "swap", "promote", "defer", "unlock", "hold")


@dataclass(frozen=True)
class QueueSnapshot:
    """What Redis holds for one queue, for `broker journal check`."""

    ready: list[int]
    processing: list[int]
    leases: dict[int, float]
    delayed: dict[int, float]


@asynccontextmanager
async def _translated(action: str) -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(f"Redis is unavailable ({action}): {exc.__class__.__name__}") from exc


class RedisQueueStore:
    """Async store over one Redis; open it with `async with`."""

    def __init__(self, url: str, *, command_timeout: float = 5.0) -> None:
        self.url = url
        self._timeout = command_timeout
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._report_abandoned: Callable[[RedisUnavailable], None] | None = None

    def report_abandoned_failures(self, report: Callable[[RedisUnavailable], None]) -> None:
        """`report` hears of a change sent in a shared pipeline that failed after its caller went away (a request
        cancelled while it waited for Redis): nobody else would, and what it changed may be missing from Redis."""
        self._report_abandoned = report

    def _abandoned_failure(self, error: BaseException) -> None:
        if self._report_abandoned is not None:
            self._report_abandoned(RedisUnavailable(
                f"Redis is unavailable (a change whose caller went away): {error.__class__.__name__}"))

    async def __aenter__(self) -> RedisQueueStore:
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            health_check_interval=30,
            max_connections=1024,
            # A pooled connection to a Redis that restarted fails once: retry it on a fresh connection rather
            # than fail the request (a command that did run twice only duplicates an id, which the journal refuses).
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.01), retries=2),
            retry_on_error=[RedisConnectionError],
        )
        # Blocking takes (BLMOVE, up to 20 s) on their own connections: no socket timeout cutting them short and no
        # retry re-issuing them; asyncio.timeout bounds each call instead.
        self._blocking = aioredis.Redis.from_url(self.url, socket_timeout=None, socket_connect_timeout=self._timeout,
                                                 max_connections=1024)
        # The hot path's shared pipelines: their own connection, no socket timeout (the pipeliner bounds each round
        # trip itself).
        self._pipeliner = Pipeliner(ConnectionPool.from_url(self.url, socket_timeout=None,
                                                            socket_connect_timeout=self._timeout),
                                    timeout=self._timeout)
        self._pipeliner.on_abandoned_failure = self._abandoned_failure
        lua = resources.files("app.stores") / "lua"
        for name in _SCRIPTS:
            self._scripts[name] = self._redis.register_script((lua / f"{name}.lua").read_text())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._redis is not None:
            await self._pipeliner.close()
            await self._redis.aclose()
            self._redis = None
        if self._blocking is not None:
            await self._blocking.aclose()
            self._blocking = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisQueueStore used outside its context")
        return self._redis

    async def _run(self, name: str, keys_: Sequence[str], args: Sequence[Any]) -> Any:
        async with _translated(name):
            return await self._scripts[name](keys=list(keys_), args=list(args))

    async def _batched(self, name: str, keys_: Sequence[str], args: Sequence[Any]) -> Any:
        """A script run in the pipeline shared with concurrent callers (the hot path). EVALSHA alone: a pipeline
        carrying registered scripts would ask SCRIPT EXISTS first, a second round trip every time."""
        script = self._scripts[name]
        async with _translated(name):
            try:
                return await self._pipeliner.call("EVALSHA", script.sha, len(keys_), *keys_, *args)
            except NoScriptError:  # Redis restarted or was flushed of scripts: load them and try once more
                for loaded in self._scripts.values():
                    await self.redis.script_load(loaded.script)
                return await self._pipeliner.call("EVALSHA", script.sha, len(keys_), *keys_, *args)

    # -- health and identity -------------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def get_epoch(self) -> str | None:
        async with _translated("epoch"):
            value = await self.redis.get(keys.EPOCH_KEY)
        return value.decode() if isinstance(value, bytes) else value

    async def set_epoch(self, epoch: str) -> None:
        async with _translated("epoch"):
            await self.redis.set(keys.EPOCH_KEY, epoch)

    async def run_id(self) -> str:
        """Changes whenever Redis restarts (even from a snapshot): part of the epoch."""
        async with _translated("info"):
            info = await self.redis.info("server")
        return str(info.get("run_id", ""))

    async def eviction_policy(self) -> str:
        async with _translated("config"):
            try:
                found = await self.redis.config_get("maxmemory-policy")
            except RedisError:  # CONFIG may be disabled on a managed Redis: unknown, not an outage
                return ""
        for value in found.values():  # one entry; bytes or str depending on the client's decoding
            return value.decode() if isinstance(value, bytes) else str(value)
        return ""

    @asynccontextmanager
    async def reconcile_lock(self, hold_seconds: float = 120.0) -> AsyncIterator[None]:
        """One reconciliation at a time across broker processes sharing this Redis."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + hold_seconds
        async with _translated("lock"):
            while not await self.redis.set(keys.RECONCILE_LOCK_KEY, token, nx=True, px=int(hold_seconds * 1000)):
                if time.monotonic() > deadline:
                    raise RedisUnavailable("another broker process holds the reconciliation lock too long")
                await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self._run("unlock", (keys.RECONCILE_LOCK_KEY,), (token,))

    async def restore(self, queue: str, pending: Sequence[int], delayed: dict[int, float],
                      leased: dict[int, float]) -> None:
        """Put ids back where the journal says they are (duplicates are refused later by the journal)."""
        k = keys.queue_keys(queue)
        async with _translated("restore"):
            pipe = self.redis.pipeline(transaction=False)
            if pending:
                pipe.lpush(k.ready, *pending)
            if delayed:
                pipe.zadd(k.delayed, {str(i): _ms(t) for i, t in delayed.items()})
            if leased:
                pipe.lpush(k.processing, *leased)
                pipe.zadd(k.leases, {str(i): _ms(t) for i, t in leased.items()})
            await pipe.execute()

    async def signal_events(self, seq: int) -> int:
        """Tell other broker processes that the journal has events up to `seq`; returns how many listeners (this
        process's own included) heard it."""
        async with _translated("publish"):
            return int(await self.redis.publish(keys.EVENTS_CHANNEL, str(seq)))

    async def event_signals(self) -> AsyncIterator[int]:
        """Signals from other broker processes (a dedicated connection; ends when it breaks)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.EVENTS_CHANNEL)
            async for message in pubsub.listen():
                if message and message.get("type") == "message":
                    yield int(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- hand-off --------------------------------------------------------------------------------------------

    async def enqueue(self, queue: str, ids: Sequence[int]) -> None:
        """Append ids to the ready list (the oldest is taken first)."""
        if ids:
            key = keys.queue_keys(queue).ready
            try:  # not _translated(): this is the hottest call, and a context manager costs a few us
                await self._pipeliner.push(key, ids)
            except (RedisError, OSError) as exc:
                raise RedisUnavailable(f"Redis is unavailable (enqueue): {exc.__class__.__name__}") from exc

    async def schedule(self, queue: str, due: dict[int, float]) -> None:
        """Add ids to the delayed set, each due at its time."""
        if due:
            key = keys.queue_keys(queue).delayed
            async with _translated("schedule"):
                await self._pipeliner.call("ZADD", key, *_scored(due))

    async def defer(self, queue: str, due: dict[int, float]) -> None:
        """Move delivered ids from processing to the delayed set."""
        if due:
            k = keys.queue_keys(queue)
            args = [v for i, t in due.items() for v in (i, _ms(t))]
            await self._batched("defer", (k.processing, k.leases, k.delayed), args)

    async def promote(self, queue: str, now: float, limit: int = 1000) -> list[int]:
        """Move delayed ids that are due to ready; return them."""
        k = keys.queue_keys(queue)
        ids = await self._run("promote", (k.delayed, k.ready), (_ms(now), limit))
        return [int(i) for i in ids]

    async def take(self, queue: str, count: int, lease_deadline: float) -> list[int]:
        """Move up to `count` ids from ready to processing, each with a lease until `lease_deadline`."""
        k = keys.queue_keys(queue)
        ids = await self._batched("take", (k.ready, k.processing, k.leases), (count, _ms(lease_deadline)))
        return [int(i) for i in ids]

    async def wait_take(self, queue: str, wait_seconds: float, lease_seconds: float) -> tuple[int, float] | None:
        """Block up to `wait_seconds` for one id (BLMOVE: the hand-off happens the moment one is pushed).
        Returns the id and its lease deadline, which starts when the id was taken."""
        k = keys.queue_keys(queue)
        async with _translated("wait"):
            # Redis takes fractional timeouts; the client's type hint says int.
            async with asyncio.timeout(wait_seconds + self._timeout):
                assert self._blocking is not None
                moved = await self._blocking.blmove(k.ready, k.processing, wait_seconds, "RIGHT", "LEFT")  # type: ignore[arg-type]
            if moved is None:
                return None
            deadline = time.time() + lease_seconds
            # A crash right here leaves the id in processing with no lease: reconciliation returns it.
            await self.redis.zadd(k.leases, {str(int(moved)): _ms(deadline)})
        return int(moved), deadline

    async def hold(self, queue: str, message_id: int, lease_deadline: float) -> None:
        """Make `message_id` held under a lease until `lease_deadline`, out of ready."""
        k = keys.queue_keys(queue)
        await self._batched("hold", (k.ready, k.processing, k.leases), (message_id, _ms(lease_deadline)))

    async def release(self, queue: str, ids: Sequence[int]) -> int:
        """Forget deliveries: remove one processing entry and the lease of each id."""
        if not ids:
            return 0
        k = keys.queue_keys(queue)
        return int(await self._batched("release", (k.processing, k.leases), ids))

    def release_later(self, queue: str, ids: Sequence[int], on_failure: Callable[[RedisUnavailable], None]) -> None:
        """`release` without waiting for Redis: the command goes into the next pipeline, and `on_failure` hears of
        it if Redis could not be reached. For removals only (an acked delivery): a rebuild racing one reads the
        journal, so whichever comes first, the id ends up gone."""
        k = keys.queue_keys(queue)
        sent = self._pipeliner.send("EVALSHA", self._scripts["release"].sha, 2, k.processing, k.leases, *ids,
                                    lazy=True)

        def settle(done: asyncio.Future[Any]) -> None:
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if error is None:
                return
            if isinstance(error, NoScriptError):  # Redis lost its scripts: the awaited call reloads them
                self._spawn(self._release_or_report(queue, ids, on_failure))
            else:
                on_failure(RedisUnavailable(f"Redis is unavailable (release): {error.__class__.__name__}"))

        sent.add_done_callback(settle)

    async def _release_or_report(self, queue: str, ids: Sequence[int],
                                 on_failure: Callable[[RedisUnavailable], None]) -> None:
        try:
            await self.release(queue, ids)
        except RedisUnavailable as exc:
            on_failure(exc)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def restore_leases(self, queue: str, deadlines: dict[int, float]) -> None:
        """Set lease deadlines again (after a stale copy of a held id was released)."""
        if deadlines:
            key = keys.queue_keys(queue).leases
            async with _translated("lease"):
                await self._pipeliner.call("ZADD", key, *_scored(deadlines))

    async def requeue(self, queue: str, ids: Sequence[int]) -> None:
        """Put delivered ids back to be taken next."""
        if ids:
            k = keys.queue_keys(queue)
            await self._batched("requeue", (k.processing, k.leases, k.ready), ids)

    async def reap(self, queue: str, now: float, limit: int = 500) -> list[int]:
        """Move ids whose lease deadline is past back to ready; return them."""
        k = keys.queue_keys(queue)
        ids = await self._run("reap", (k.leases, k.processing, k.ready), (_ms(now), limit))
        return [int(i) for i in ids]

    async def purge(self, queue: str) -> None:
        k = keys.queue_keys(queue)
        async with _translated("purge"):
            await self.redis.delete(k.ready, k.delayed)

    async def drop_queue(self, queue: str) -> None:
        async with _translated("delete"):
            await self.redis.delete(*keys.queue_keys(queue).all(), *keys.rebuild_keys(queue).all())

    # -- reconciliation --------------------------------------------------------------------------------------

    async def rebuild(
        self,
        queue: str,
        ready: AsyncIterator[list[int]],
        processing: AsyncIterator[list[tuple[int, float]]],
        delayed: AsyncIterator[list[tuple[int, float]]],
    ) -> None:
        """Refill a queue's structures from chunks the journal streams, then swap them in atomically."""
        real, tmp = keys.queue_keys(queue), keys.rebuild_keys(queue)
        async with _translated("rebuild"):
            await self.redis.delete(*tmp.all())
            async for chunk in ready:
                if chunk:
                    await self.redis.lpush(tmp.ready, *chunk)
            async for leased in processing:
                if leased:
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.lpush(tmp.processing, *(i for i, _ in leased))
                    pipe.zadd(tmp.leases, {str(i): _ms(deadline) for i, deadline in leased})
                    await pipe.execute()
            async for scheduled in delayed:
                if scheduled:
                    await self.redis.zadd(tmp.delayed, {str(i): _ms(due) for i, due in scheduled})
        await self._run("swap", (*real.all(), *tmp.all()), ())

    async def snapshot(self, queue: str) -> QueueSnapshot:
        k = keys.queue_keys(queue)
        async with _translated("snapshot"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.lrange(k.ready, 0, -1)
            pipe.lrange(k.processing, 0, -1)
            pipe.zrange(k.leases, 0, -1, withscores=True)
            pipe.zrange(k.delayed, 0, -1, withscores=True)
            ready, processing, leases, delayed = await pipe.execute()
        return QueueSnapshot(
            ready=[int(i) for i in ready],
            processing=[int(i) for i in processing],
            leases={int(i): score / 1000 for i, score in leases},
            delayed={int(i): score / 1000 for i, score in delayed},
        )

    async def queue_names(self) -> set[str]:
        """Queues that have any key in Redis (to find leftovers of deleted queues)."""
        names: set[str] = set()
        async with _translated("scan"):
            async for key in self.redis.scan_iter(match=keys.QUEUE_KEY_PATTERN, count=1000):
                name = keys.queue_of_key(key.decode())
                if name is not None:
                    names.add(name)
        return names


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _scored(members: dict[int, float]) -> list[int]:
    """ZADD's arguments: score (ms) then member, for each id."""
    return [v for i, t in members.items() for v in (_ms(t), i)]
