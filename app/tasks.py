"""Background loops inside the broker process (no extra daemon): Redis watcher, lease reaper, delay promoter,
retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from app.broker import Broker
from app.errors import BrokerError

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Starts the loops on enter and stops them on exit. A failing round is logged and retried next round."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> BackgroundTasks:
        settings = self.broker.settings
        self._start("redis-watcher", self.broker.recovery.watch_once, settings.redis_check_interval_seconds)
        self._start("lease-reaper", self._when_redis_up(self.broker.reap_expired_leases),
                    settings.reaper_interval_seconds)
        self._start("delay-promoter", self._when_redis_up(self.broker.promote_delayed),
                    settings.promoter_interval_seconds)
        self._start("retention", self.broker.apply_retention, settings.retention_interval_seconds)
        # Other broker processes on the same journal may change queues: pick their changes up.
        self._start("journal-refresh", self.broker.journal.refresh, settings.redis_check_interval_seconds)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()  # each loop ends after its current round; a cancel would be lost inside some clients
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _when_redis_up(self, step: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def guarded() -> None:
            if self.broker.recovery.redis_up:
                await step()

        return guarded

    def _start(self, name: str, step: Callable[[], Awaitable[Any]], interval: float) -> None:
        self._tasks.append(asyncio.create_task(self._every(name, step, interval), name=name))

    async def _every(self, name: str, step: Callable[[], Awaitable[Any]], interval: float) -> None:
        while not self._stop.is_set():
            try:
                await step()
            except BrokerError as exc:
                log.warning("%s: %s", name, exc.detail)
            except Exception:
                log.exception("%s failed; retrying in %.1fs", name, interval)
            try:
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            except TimeoutError:
                pass
