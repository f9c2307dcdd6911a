"""A shared/exclusive gate around Redis changes, so a rebuild of Redis never interleaves with them.

Ordinary operations (a publish's push, a delivery, an ack's release) pass in shared mode and run concurrently;
reconciliation, purge and queue deletion take it exclusively, waiting for the shared holders to leave and
holding new ones back until they are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType


class Gate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._changed = asyncio.Condition()
        self._notifications: set[asyncio.Task[None]] = set()
        self._shared_mode = _Shared(self)

    def shared(self) -> _Shared:
        """`async with gate.shared():` (every holder uses the same stateless context manager: it is on every
        request's path, and a generator-based one costs a few microseconds more)."""
        return self._shared_mode

    async def _enter_shared(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
            self._shared += 1

    def _leave_shared(self) -> None:
        self._shared -= 1
        if self._waiting_exclusive and not self._shared:
            # A task of its own: the caller may be cancelled right here, and the waiter must still hear it.
            task = asyncio.ensure_future(self._notify())
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

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


class _Shared:
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        gate = self._gate
        if gate._exclusive or gate._waiting_exclusive:  # the common case skips the condition entirely
            await gate._enter_shared()
        else:
            gate._shared += 1  # no await between the check and this: atomic on the event loop

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._gate._leave_shared()
