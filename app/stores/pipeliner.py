"""Coalesce the Redis commands of concurrent requests into one pipeline (one round trip for many callers).

While a pipeline is in flight, new commands queue up; the next pipeline takes all of them. A lone caller pays
one round trip as before; under load, a hundred publishes cost one round trip instead of a hundred.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

Stage = Callable[[Pipeline], Any]  # adds exactly one command to the pipeline


class Pipeliner:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pending: list[tuple[Stage, asyncio.Future[Any]]] = []
        self._pushes: dict[str, tuple[list[int], asyncio.Future[Any]]] = {}  # one LPUSH per list and pipeline
        self._flushing = False

    async def call(self, stage: Stage) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((stage, future))
        self._schedule()
        return await future

    async def push(self, key: str, ids: Sequence[int]) -> None:
        """LPUSH ids to a list; concurrent pushes to one list share a single command."""
        merged = self._pushes.get(key)
        if merged is None:
            merged = ([], asyncio.get_running_loop().create_future())
            self._pushes[key] = merged
            self._pending.append((lambda pipe: pipe.lpush(key, *merged[0]), merged[1]))
            self._schedule()
        merged[0].extend(ids)
        await asyncio.shield(merged[1])  # shared by several callers: one leaving must not cancel it for all

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush)  # gather this loop iteration's callers

    def _start_flush(self) -> None:
        task = asyncio.ensure_future(self._flush())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self._pushes = {}  # later pushes go to the next pipeline
                pipe = self._client.pipeline(transaction=False)
                for stage, _ in batch:
                    stage(pipe)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except BaseException as exc:  # the round trip failed: every caller of this batch learns it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flushing = False
            if self._pending:  # arrived while the last round trip was failing out
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._start_flush)
