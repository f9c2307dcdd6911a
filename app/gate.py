"""A shared/exclusive gate around Redis changes, so a rebuild of Redis never interleaves with them.

Ordinary operations (a publish's push, a delivery, an ack's release) pass in shared mode and run concurrently;
reconciliation, purge and queue deletion take it exclusively, waiting for the shared holders to leave and
holding new ones back until they are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Gate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._changed = asyncio.Condition()
        self._notifications: set[asyncio.Task[None]] = set()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        if self._exclusive or self._waiting_exclusive:  # the common case skips the condition entirely
            async with self._changed:
                await self._changed.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
                self._shared += 1
        else:
            self._shared += 1  # no await between the check and this: atomic on the event loop
        try:
            yield
        finally:
            self._shared -= 1
            if self._waiting_exclusive and not self._shared:
                # A task of its own: the caller may be cancelled right here, and the waiter must still hear it.
                task = asyncio.ensure_future(self._notify())
                self._notifications.add(task)
                task.add_done_callback(self._notifications.discard)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_exclusive += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting_exclusive -= 1
                self._changed.notify_all()  # shared callers held back by this waiter may go (if it gave up)
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()
