"""One event fan-out per process, for SSE streams and GraphQL subscriptions.

The journal is the only source: a tailer reads committed events by `seq` (global and monotonic, also across
broker processes) and hands each to every matching subscriber, so live delivery and replay cannot disagree. It
wakes at once on this process's commits, on a Redis pub/sub signal from other broker processes, and at least
every `POLL_SECONDS`. Subscribers never touch Redis or SQLite. A subscriber whose buffer fills (a client that
stopped reading) is cut off rather than slowing anyone down; it reconnects with Last-Event-ID and replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from app.errors import RateLimited
from app.models import Event
from app.stores.redis_queue import RedisQueueStore
from app.stores.sqlite_journal import SqliteJournalStore

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
SIGNAL_SECONDS = 0.002
LONE_SIGNAL_SECONDS = POLL_SECONDS  # another process's tailer polls this often anyway
REPLAY_PAGE = 1000


class SubscriberOverflow(Exception):
    """The subscriber fell more than BUFFER events behind."""


@dataclass
class EventFilter:
    queues: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    def __call__(self, event: Event) -> bool:
        return (not self.queues or event.queue in self.queues) and (not self.types or event.type.value in self.types)


@dataclass(eq=False)
class _Subscriber:
    accepts: EventFilter
    inbox: asyncio.Queue[Event | None]
    overflowed: bool = False


class EventHub:
    def __init__(self, journal: SqliteJournalStore, redis: RedisQueueStore, *, on_count: Callable[[int], None],
                 buffer: int = 2000, max_streams_per_user: int = 20) -> None:
        """`buffer`: how many events a subscriber may fall behind by before it is cut off."""
        self.journal = journal
        self.buffer = buffer
        self.max_streams_per_user = max_streams_per_user
        self.redis = redis
        self._on_count = on_count
        self._subscribers: set[_Subscriber] = set()
        self._wake = asyncio.Event()
        self._last_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: Counter[str] = Counter()
        self._stopping = False
        self._signal = asyncio.Event()
        self._committed_seq = 0

    async def __aenter__(self) -> EventHub:
        self._last_seq = await self.journal.last_seq()
        self.journal.add_listener(self._on_commit)
        self._tasks = [asyncio.create_task(self._tail(), name="event-tailer"),
                       asyncio.create_task(self._listen(), name="event-wakeups"),
                       asyncio.create_task(self._send_signals(), name="event-signals")]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        # A client library may swallow a cancel (redis-py's pub/sub can): the loops also check _stopping, and
        # stopping never waits on them for long.
        await asyncio.wait(self._tasks, timeout=2)
        for subscriber in list(self._subscribers):
            self._close(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def require_stream_slot(self, username: str) -> None:
        """Refuse a new stream (SSE or GraphQL subscription) past the per-user cap."""
        if self._streams[username] >= self.max_streams_per_user:
            raise RateLimited(f"At most {self.max_streams_per_user} event streams per user; close one first", 5,
                              code="too_many_streams")

    @contextlib.contextmanager
    def stream_of(self, username: str) -> Iterator[None]:
        """Count one open stream of `username` (for the per-user cap) while it lasts."""
        self._streams[username] += 1
        try:
            yield
        finally:
            self._streams[username] -= 1
            if not self._streams[username]:
                del self._streams[username]

    async def subscribe(self, accepts: EventFilter, since: int | None = None) -> AsyncIterator[Event]:
        """Events accepted by the filter: first every one after `since` from the journal (when given), then live
        ones, in `seq` order, with no gap and no repeat. Raises SubscriberOverflow if the reader falls behind."""
        subscriber = _Subscriber(accepts, asyncio.Queue(self.buffer))
        if not self._subscribers:  # the tailer idles without subscribers: skip what nobody was listening to
            self._last_seq = max(self._last_seq, await self.journal.last_seq())
        self._subscribers.add(subscriber)  # buffer live events before replaying, so nothing falls in between
        self._on_count(len(self._subscribers))
        try:
            sent = since if since is not None else await self.journal.last_seq()
            if since is not None:
                while True:
                    page = await self.journal.events_after(sent, limit=REPLAY_PAGE)
                    for event in page:
                        sent = event.seq
                        if accepts(event):
                            yield event
                    if len(page) < REPLAY_PAGE:
                        break
            while True:
                live = await subscriber.inbox.get()
                if live is None:
                    if subscriber.overflowed:
                        raise SubscriberOverflow(f"fell more than {self.buffer} events behind")
                    return
                if live.seq > sent:
                    sent = live.seq
                    yield live
        finally:
            self._subscribers.discard(subscriber)
            self._on_count(len(self._subscribers))

    def _on_commit(self, events: list[Event]) -> None:
        self._wake.set()
        self._committed_seq = events[-1].seq
        self._signal.set()

    async def _send_signals(self) -> None:
        """Tell other processes' tailers about our commits: one PUBLISH for however many commits came since the
        last one (a hint only; they also poll). At most one every SIGNAL_SECONDS, and while no other process
        listens (the PUBLISH reached only this one's own subscription), at most one every LONE_SIGNAL_SECONDS:
        one per commit cost a Redis round trip per commit, a fifth of a lone broker's time at one publisher."""
        while not self._stopping:
            await self._signal.wait()
            self._signal.clear()
            pause = SIGNAL_SECONDS
            try:
                if await self.redis.signal_events(self._committed_seq) <= 1:
                    pause = LONE_SIGNAL_SECONDS
            except Exception as exc:
                log.debug("event signal not sent: %s", exc)
            await asyncio.sleep(pause)

    async def _listen(self) -> None:
        while not self._stopping:
            try:
                async for _ in self.redis.event_signals():
                    self._wake.set()
            except Exception as exc:  # Redis down: polling still delivers, just later
                log.debug("event signal subscription failed: %s", exc)
            await asyncio.sleep(POLL_SECONDS)

    async def _tail(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_new()
            except Exception:
                log.exception("event tailer failed; retrying")

    async def _dispatch_new(self) -> None:
        while self._subscribers:
            page = await self.journal.events_after(self._last_seq, limit=REPLAY_PAGE)
            for event in page:
                self._last_seq = event.seq
                for subscriber in list(self._subscribers):
                    if subscriber.accepts(event):
                        self._offer(subscriber, event)
            if len(page) < REPLAY_PAGE:
                return

    def _offer(self, subscriber: _Subscriber, event: Event) -> None:
        try:
            subscriber.inbox.put_nowait(event)
        except asyncio.QueueFull:
            subscriber.overflowed = True
            self._close(subscriber)

    def _close(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        with contextlib.suppress(asyncio.QueueFull):
            subscriber.inbox.put_nowait(None)
        if subscriber.inbox.full():  # make room for the end marker: the reader is cut off anyway
            with contextlib.suppress(asyncio.QueueEmpty):
                subscriber.inbox.get_nowait()
            subscriber.inbox.put_nowait(None)
