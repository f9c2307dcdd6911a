"""SqliteJournalStore on real SQLite files under tmp_path: group commit, the message state machine, failures."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import JournalUnavailable, MessageNotFound, NotProcessing, StaleLease
from app.models import Event, EventType, Message, MessageStatus, NewMessage, Queue, QueueSettings
from app.stores import journal_connection, journal_writer
from app.stores.sqlite_journal import SqliteJournalStore


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "j.sqlite3"


@pytest.fixture
async def journal(path: Path) -> AsyncIterator[SqliteJournalStore]:
    async with SqliteJournalStore(path) as store:
        yield store


@pytest.fixture
async def queue(journal: SqliteJournalStore) -> Queue:
    return await journal.create_queue("q", QueueSettings(), "test")


async def _publish(journal: SqliteJournalStore, queue: Queue, n: int = 1) -> list[int]:
    results = await journal.publish(queue, [NewMessage(content=f'"m{i}"') for i in range(n)], "test")
    return [r.message_id for r in results]


async def _deliver(journal: SqliteJournalStore, queue: Queue, message_id: int, lease_seconds: float = 30.0) -> Message:
    delivered, refused, _ = await journal.record_deliveries(queue, [message_id], time.time() + lease_seconds, "c")
    assert refused == []
    assert len(delivered) == 1
    return delivered[0]


async def _message(journal: SqliteJournalStore, message_id: int) -> Message:
    message = await journal.get_message(message_id)
    assert message is not None, f"message {message_id} is not in the journal"
    return message


def _types(events: list[Event]) -> list[EventType]:
    return [e.type for e in events]


# -- group commit and durability ---------------------------------------------------------------------------------


async def test_concurrent_publishes_share_commits_and_are_durable_after_reopen(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        setup_commits, setup_ops = journal.stats.commits, journal.stats.operations
        assert (setup_commits, setup_ops) == (1, 1)

        results = await asyncio.gather(
            *(journal.publish(queue, [NewMessage(content=f'"{i}"')], "test") for i in range(200))
        )

        assert journal.stats.operations == setup_ops + 200
        assert journal.stats.commits - setup_commits < 200
        assert journal.stats.commits - setup_commits < 50, journal.stats
        contents = {r[0].message_id: f'"{i}"' for i, r in enumerate(results)}
        assert len(contents) == 200

    async with SqliteJournalStore(path) as reopened:
        for message_id, content in contents.items():
            stored = await _message(reopened, message_id)
            assert stored.status is MessageStatus.PENDING
            assert stored.content == content
        assert (await reopened.counts(reopened.queue("q")))["pending"] == 200


async def test_ids_and_event_seqs_strictly_increase_and_continue_after_reopen(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        first = await _publish(journal, queue, 3)
        more = await asyncio.gather(*(_publish(journal, queue, 2) for _ in range(5)))
        ids = first + [i for batch in more for i in batch]
        events = await journal.events_after(0)

    assert sorted(ids) == ids and len(set(ids)) == len(ids) == 13
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1)), "event seqs must be gapless and strictly increasing"
    assert len(events) == 1 + 13

    async with SqliteJournalStore(path) as reopened:
        later = await _publish(reopened, reopened.queue("q"), 2)
        new_events = await reopened.events_after(seqs[-1])
    assert later == [ids[-1] + 1, ids[-1] + 2]
    assert [e.seq for e in new_events] == [seqs[-1] + 1, seqs[-1] + 2]
    assert [e.message_id for e in new_events] == later


# -- ack and nack refusals ---------------------------------------------------------------------------------------


async def test_ack_with_a_stale_lease_is_refused(journal: SqliteJournalStore, queue: Queue) -> None:
    (message_id,) = await _publish(journal, queue)
    delivered = await _deliver(journal, queue, message_id)

    with pytest.raises(StaleLease) as refused:
        await journal.ack(message_id, uuid.uuid4().hex, "c")

    assert refused.value.status_code == 409
    current = await _message(journal, message_id)
    assert current.status is MessageStatus.PROCESSING
    assert current.lease_id == delivered.lease_id
    acked = await journal.ack(message_id, delivered.lease_id, "c")
    assert acked.status is MessageStatus.PROCESSED


async def test_ack_of_a_message_not_being_processed_is_refused(journal: SqliteJournalStore, queue: Queue) -> None:
    (message_id,) = await _publish(journal, queue)

    with pytest.raises(NotProcessing) as refused:
        await journal.ack(message_id, None, "c")

    assert refused.value.status_code == 409
    delivered = await _deliver(journal, queue, message_id)
    await journal.ack(message_id, delivered.lease_id, "c")
    with pytest.raises(NotProcessing):
        await journal.ack(message_id, delivered.lease_id, "c")
    with pytest.raises(NotProcessing):
        await journal.nack(message_id, delivered.lease_id, True, 0.0, "again", "c")


async def test_ack_or_nack_of_an_unknown_id_is_message_not_found(journal: SqliteJournalStore, queue: Queue) -> None:
    with pytest.raises(MessageNotFound) as refused:
        await journal.ack(12345, None, "c")
    assert refused.value.status_code == 404
    with pytest.raises(MessageNotFound):
        await journal.nack(12345, None, True, 0.0, None, "c")


# -- deliveries --------------------------------------------------------------------------------------------------


async def test_record_deliveries_refuses_a_message_held_under_a_live_lease(
    journal: SqliteJournalStore, queue: Queue
) -> None:
    (message_id,) = await _publish(journal, queue)
    first = await _deliver(journal, queue, message_id)

    delivered, refused, _ = await journal.record_deliveries(queue, [message_id], time.time() + 30, "other")

    assert delivered == []
    assert refused == [(message_id, first.lease_expires_at)]
    current = await _message(journal, message_id)
    assert (current.lease_id, current.delivery_count) == (first.lease_id, 1)
    assert _types(await journal.history(message_id)) == [EventType.MESSAGE_PUBLISHED, EventType.MESSAGE_DELIVERED]


async def test_record_deliveries_refuses_terminal_and_unknown_messages(
    journal: SqliteJournalStore, queue: Queue
) -> None:
    done, failed, fresh = await _publish(journal, queue, 3)
    lease = (await _deliver(journal, queue, done)).lease_id
    await journal.ack(done, lease, "c")
    lease = (await _deliver(journal, queue, failed)).lease_id
    await journal.nack(failed, lease, False, 0.0, "bad input", "c")
    other = await journal.create_queue("other", QueueSettings(), "test")
    (elsewhere,) = await _publish(journal, other)

    delivered, refused, _ = await journal.record_deliveries(
        queue, [done, failed, 999, elsewhere, fresh], time.time() + 30, "c"
    )

    assert [m.id for m in delivered] == [fresh]
    assert sorted(refused) == sorted([(done, None), (failed, None), (999, None), (elsewhere, None)])
    for message_id, status in ((done, "processed"), (failed, "failed"), (elsewhere, "pending")):
        assert (await _message(journal, message_id)).status == status


async def test_a_processing_message_whose_lease_expired_is_delivered_again(
    journal: SqliteJournalStore, queue: Queue
) -> None:
    (message_id,) = await _publish(journal, queue)
    first = await _deliver(journal, queue, message_id, lease_seconds=-1)  # its lease is already over

    second = await _deliver(journal, queue, message_id)

    assert second.delivery_count == 2
    assert second.status is MessageStatus.PROCESSING
    assert second.lease_id != first.lease_id
    history = await journal.history(message_id)
    assert _types(history) == [
        EventType.MESSAGE_PUBLISHED,
        EventType.MESSAGE_DELIVERED,
        EventType.MESSAGE_LEASE_EXPIRED,
        EventType.MESSAGE_DELIVERED,
    ]
    assert history[2].data["lease_id"] == first.lease_id
    assert history[3].data["lease_id"] == second.lease_id
    with pytest.raises(StaleLease):
        await journal.ack(message_id, first.lease_id, "c")


async def test_nack_with_requeue_past_max_deliveries_ends_failed_with_the_reason(
    journal: SqliteJournalStore,
) -> None:
    queue = await journal.create_queue("limited", QueueSettings(max_deliveries=2), "test")
    (message_id,) = await _publish(journal, queue)

    lease = (await _deliver(journal, queue, message_id)).lease_id
    requeued = (await journal.nack(message_id, lease, True, 0.0, "try again", "c")).message
    assert requeued.status is MessageStatus.PENDING
    assert requeued.last_error == "try again"
    lease = (await _deliver(journal, queue, message_id)).lease_id
    final = (await journal.nack(message_id, lease, True, 0.0, "still broken", "c")).message

    assert final.status is MessageStatus.FAILED
    assert final.delivery_count == 2
    assert final.last_error is not None and "still broken" in final.last_error
    assert final.lease_id is None
    history = await journal.history(message_id)
    assert history[-1].type is EventType.MESSAGE_FAILED
    delivered, refused, _ = await journal.record_deliveries(queue, [message_id], time.time() + 30, "c")
    assert delivered == [] and refused == [(message_id, None)]


# -- events and counts -------------------------------------------------------------------------------------------


async def test_every_transition_appends_exactly_one_event(journal: SqliteJournalStore, queue: Queue) -> None:
    (message_id,) = await _publish(journal, queue)
    expected = [EventType.MESSAGE_PUBLISHED]
    lease = (await _deliver(journal, queue, message_id)).lease_id
    expected.append(EventType.MESSAGE_DELIVERED)
    await journal.nack(message_id, lease, True, 0.0, "later", "c")
    expected.append(EventType.MESSAGE_NACKED)
    lease = (await _deliver(journal, queue, message_id)).lease_id
    expected.append(EventType.MESSAGE_DELIVERED)
    with pytest.raises(StaleLease):  # refused: no event
        await journal.ack(message_id, "not-the-lease", "c")
    await journal.record_deliveries(queue, [message_id], time.time() + 30, "c")  # refused: no event
    await journal.ack(message_id, lease, "c")
    expected.append(EventType.MESSAGE_ACKED)

    history = await journal.history(message_id)

    assert _types(history) == expected
    assert all(e.message_id == message_id and e.queue == "q" for e in history)
    assert [e.data["status"] for e in history] == ["pending", "processing", "pending", "processing", "processed"]
    assert [e.actor for e in history] == ["test", "c", "c", "c", "c"]
    seqs = [e.seq for e in history]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    everything = await journal.events_after(0)
    assert len(everything) == 1 + len(expected)  # the queue's creation, then this message's transitions


async def test_counts_track_transitions_and_survive_reopen(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        a, b, c, _d = await _publish(journal, queue, 4)
        await journal.publish(queue, [NewMessage(content='"later"', delay_seconds=60)], "test")
        lease_a = (await _deliver(journal, queue, a)).lease_id
        await journal.ack(a, lease_a, "c")
        lease_b = (await _deliver(journal, queue, b)).lease_id
        await journal.nack(b, lease_b, False, 0.0, "poison", "c")
        await _deliver(journal, queue, c)
        expected = {"pending": 1, "delayed": 1, "processing": 1, "processed": 1, "failed": 1}
        assert await journal.counts(queue) == expected

    async with SqliteJournalStore(path) as reopened:
        assert await reopened.counts(reopened.queue("q")) == expected


# -- failures ----------------------------------------------------------------------------------------------------


async def _set_max_page_count(journal: SqliteJournalStore, pages: int | None = None) -> None:
    """Simulate a full disk on the writer's connection: no page beyond `pages` (default: the current count)."""
    if pages is None:
        [(pages,)] = await journal.execute_on_writer("PRAGMA page_count")
    await journal.execute_on_writer(f"PRAGMA max_page_count = {int(pages)}")


BIG = NewMessage(content='"' + "x" * 200_000 + '"')  # needs new pages whatever the free space in the file


async def test_a_failing_commit_raises_journal_unavailable_and_keeps_earlier_data(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        (kept_id,) = await _publish(journal, queue)
        kept = await _message(journal, kept_id)
        last_seq = (await journal.events_after(0))[-1].seq
        await _set_max_page_count(journal)  # the disk is "full" now

        with pytest.raises(JournalUnavailable) as refused:
            await journal.publish(queue, [BIG], "test")

        assert refused.value.status_code == 503
        assert "Retry-After" in refused.value.headers
        assert journal.healthy is False
        assert await journal.ping() is False
        assert journal.stats.last_error is not None
        assert await journal.get_message(kept_id) == kept
        assert await journal.get_message(kept_id + 1) is None
        assert (await journal.counts(queue))["pending"] == 1
        assert [e.seq for e in await journal.events_after(0)][-1] == last_seq

        await _set_max_page_count(journal, 1_000_000)
        (after_id,) = [r.message_id for r in await journal.publish(queue, [BIG], "test")]

        assert journal.healthy is True
        assert await journal.ping() is True
        assert after_id == kept_id + 1, "the refused batch must not use up ids"
        assert [e.seq for e in await journal.events_after(last_seq)] == [last_seq + 1]
        assert (await journal.counts(queue))["pending"] == 2

    async with SqliteJournalStore(path) as reopened:
        assert await reopened.get_message(kept_id) == kept
        assert (await _message(reopened, after_id)).content == BIG.content
        assert (await reopened.counts(reopened.queue("q")))["pending"] == 2


async def test_a_failing_commit_refuses_every_operation_of_its_batch(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        (message_id,) = await _publish(journal, queue)
        lease = (await _deliver(journal, queue, message_id)).lease_id
        await _set_max_page_count(journal)

        results = await asyncio.gather(
            journal.publish(queue, [BIG], "test"), journal.ack(message_id, lease, "c"), return_exceptions=True
        )

        assert all(isinstance(r, JournalUnavailable) for r in results), results
        assert (await _message(journal, message_id)).status is MessageStatus.PROCESSING
        assert (await journal.counts(queue))["processing"] == 1
        await _set_max_page_count(journal, 1_000_000)
        acked = await journal.ack(message_id, lease, "c")
        assert acked.status is MessageStatus.PROCESSED


async def test_a_refused_operation_does_not_affect_the_others_in_its_batch(
    journal: SqliteJournalStore, queue: Queue
) -> None:
    a, b = await _publish(journal, queue, 2)
    lease_a = (await _deliver(journal, queue, a)).lease_id
    lease_b = (await _deliver(journal, queue, b)).lease_id
    commits = journal.stats.commits

    results = await asyncio.gather(
        journal.ack(a, "stale-lease", "c"),
        journal.ack(b, lease_b, "c"),
        journal.publish(queue, [NewMessage(content='"new"')], "test"),
        journal.ack(999_999, None, "c"),
        return_exceptions=True,
    )

    assert journal.stats.commits == commits + 1, "the four operations were meant to share one batch"
    assert isinstance(results[0], StaleLease)
    assert isinstance(results[1], Message) and results[1].status is MessageStatus.PROCESSED
    assert isinstance(results[2], list) and results[2][0].status is MessageStatus.PENDING
    assert isinstance(results[3], MessageNotFound)
    current_a = await _message(journal, a)
    assert (current_a.status, current_a.lease_id) == (MessageStatus.PROCESSING, lease_a)
    assert _types(await journal.history(a)) == [EventType.MESSAGE_PUBLISHED, EventType.MESSAGE_DELIVERED]
    assert _types(await journal.history(b))[-1] is EventType.MESSAGE_ACKED
    assert await journal.counts(queue) == {"pending": 1, "delayed": 0, "processing": 1, "processed": 1, "failed": 0}
    seqs = [e.seq for e in await journal.events_after(0)]
    assert seqs == list(range(1, len(seqs) + 1))


# -- ids beyond SQLite's integer range and unexpected errors ----------------------------------------------------

BEYOND_INT64 = 2**64  # a client can send any digits in /messages/{id}/ack


async def test_an_ack_of_an_id_beyond_the_integer_range_is_not_found_and_spares_its_batch(
    journal: SqliteJournalStore, queue: Queue
) -> None:
    results = await asyncio.gather(
        journal.ack(BEYOND_INT64, None, "c"),
        journal.publish(queue, [NewMessage(content='"innocent"')], "test"),
        return_exceptions=True,
    )

    assert isinstance(results[0], MessageNotFound), results[0]
    assert isinstance(results[1], list), f"an unrelated publish of the same batch was refused: {results[1]!r}"
    assert journal.healthy is True


async def test_reading_an_id_beyond_the_integer_range_finds_nothing(journal: SqliteJournalStore, queue: Queue) -> None:
    assert await journal.get_message(BEYOND_INT64) is None
    assert await journal.history(BEYOND_INT64) == []


async def test_an_operation_failing_unexpectedly_is_answered_and_the_writer_keeps_going(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        broken = NewMessage(content='"x"', headers={"k": {1}})  # type: ignore[dict-item]  # not serializable

        try:
            outcome = await asyncio.wait_for(
                asyncio.gather(journal.publish(queue, [broken], "test"), return_exceptions=True), 3
            )
        except TimeoutError:
            pytest.fail("the caller was never answered: the journal writer task died")
        assert isinstance(outcome[0], Exception)

        (later,) = await _publish(journal, queue)
        assert (await _message(journal, later)).status is MessageStatus.PENDING


async def test_ids_are_never_reused_after_the_newest_message_or_queue_is_deleted(path: Path) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        [first] = await journal.publish(queue, [NewMessage(content='"a"')], "test")
        await journal.purge_queue(queue, "test")
        [second] = await journal.publish(queue, [NewMessage(content='"b"')], "test")
        assert second.message_id > first.message_id
        await journal.delete_queue(queue, "test")
    async with SqliteJournalStore(path) as journal:  # and across a restart
        again = await journal.create_queue("q2", QueueSettings(), "test")
        assert again.id > queue.id
        [third] = await journal.publish(again, [NewMessage(content='"c"')], "test")
        assert third.message_id > second.message_id


# -- the writer: bounds, a stuck commit, checkpoints -------------------------------------------------------------


async def test_a_batch_stops_taking_operations_at_its_row_bound(journal: SqliteJournalStore, queue: Queue) -> None:
    journal._writer.batch_rows = 10  # type: ignore[union-attr]
    commits = journal.stats.commits
    four = [NewMessage(content=f'"{i}"') for i in range(4)]
    await asyncio.gather(*(journal.publish(queue, four, "test") for _ in range(6)))
    # 4 + 4 + 4 rows reach the bound: two transactions of three publishes, not one of six.
    assert journal.stats.commits - commits == 2 and journal.stats.last_batch_size == 3


async def test_a_commit_stuck_behind_another_process_answers_its_callers_and_refuses_what_waits(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_writer, "SUBMIT_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(journal_writer, "WATCH_SECONDS", 0.05)
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")
        late: list[int] = []

        def broken() -> None:
            raise RuntimeError("a listener's bug")

        journal.add_late_commit_listener(broken)  # must not stop the writer, nor the listeners after it
        journal.add_late_commit_listener(lambda: late.append(1))
        # Another process committing and then stopped (SIGSTOP) while it holds the journal's lock:
        peer = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)
        fcntl.flock(peer, fcntl.LOCK_EX)
        try:
            stuck = journal.publish(queue, [NewMessage(content='"stuck"')], "test")
            await asyncio.sleep(0.1)  # the writer is waiting for the lock
            behind = journal.publish(queue, [NewMessage(content='"behind"')], "test")
            results = await asyncio.wait_for(asyncio.gather(stuck, behind, return_exceptions=True), 5)
            assert all(isinstance(r, JournalUnavailable) for r in results), results
            assert "unknown" in str(results[0]) and "nothing was written" in str(results[1])
            assert not journal.healthy
        finally:
            fcntl.flock(peer, fcntl.LOCK_UN)
            os.close(peer)
        (later,) = await asyncio.wait_for(_publish(journal, queue), 5)
        assert journal.healthy
        assert late == [1]  # the stuck commit landed after its callers heard "unknown": its owners hear of it
        contents = {m.content for m in await journal.browse(queue, None, 0, 10)}
        assert contents == {'"stuck"', (await _message(journal, later)).content}  # the stuck one did commit


async def test_the_wal_is_checkpointed_beside_the_commits(journal: SqliteJournalStore, queue: Queue) -> None:
    for _ in range(journal_writer.CHECKPOINT_EVERY_COMMITS + 10):
        await _publish(journal, queue)
    for _ in range(100):
        if journal.stats.checkpoints:
            break
        await asyncio.sleep(0.02)
    assert journal.stats.checkpoints >= 1


async def test_a_failed_flush_answers_outcome_unknown_and_refuses_every_later_write(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SqliteJournalStore(path) as journal:
        queue = await journal.create_queue("q", QueueSettings(), "test")

        def eio(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(journal_connection.os, "fdatasync", eio)
        with pytest.raises(JournalUnavailable, match="outcome is unknown"):
            await _publish(journal, queue)
        monkeypatch.undo()  # the disk seems fine again, but what it lost is unknown (and Linux may not say again)
        with pytest.raises(JournalUnavailable, match="restarted"):
            await _publish(journal, queue)
        assert not journal.healthy


async def test_after_a_stalled_flush_the_writer_flushes_on_a_thread_until_the_disk_is_fast_again(
    journal: SqliteJournalStore, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk must not hold the event loop (every other request) for each flush; a fast one is flushed on the
    loop, where it costs least."""
    monkeypatch.setattr(journal_writer, "FLUSHES_TO_RETURN", 3)
    monkeypatch.setattr(journal_writer, "STALL_SECONDS", 0.02)
    monkeypatch.setattr(journal_writer, "SLOW_AVERAGE_SECONDS", 0.05)
    fdatasync = os.fdatasync
    slow = True
    flushed_on: list[str] = []

    def timed_fdatasync(fd: int) -> None:
        flushed_on.append(threading.current_thread().name)
        if slow:
            time.sleep(0.03)  # a stall
        fdatasync(fd)

    monkeypatch.setattr(journal_connection.os, "fdatasync", timed_fdatasync)
    await _publish(journal, queue)
    await _publish(journal, queue)
    assert flushed_on[0] == "MainThread" and flushed_on[1].startswith("journal-flush")
    slow = False
    flushed_on.clear()
    for _ in range(5):
        await _publish(journal, queue)
    assert [name.startswith("journal-flush") for name in flushed_on] == [True, True, False, False, False]
    assert journal.healthy and (await journal.counts(queue))["pending"] == 7


async def test_a_cancelled_run_keeps_the_writing_connection_until_its_function_returns(
    journal: SqliteJournalStore, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread goes on with the connection when its caller is cancelled: a commit must not use it meanwhile
    (sqlite3 connections are not for two threads at once)."""
    writer = journal._writer
    assert writer is not None
    order: list[str] = []

    def slow() -> None:
        time.sleep(0.3)
        order.append("run returned")

    transaction = writer.db.transaction

    def recorded(batch: Any) -> Any:
        order.append("commit")
        return transaction(batch)

    monkeypatch.setattr(writer.db, "transaction", recorded)
    running = asyncio.create_task(writer.run(slow))
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await _publish(journal, queue)
    assert order == ["run returned", "commit"]


async def test_flushes_slow_on_average_move_to_the_flush_thread_too(
    journal: SqliteJournalStore, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_writer, "SLOW_AVERAGE_SECONDS", 0.002)
    monkeypatch.setattr(journal_writer, "FLUSH_AVERAGE_WEIGHT", 0.5)
    fdatasync = os.fdatasync
    flushed_on: list[str] = []

    def slowish_fdatasync(fd: int) -> None:  # under STALL_SECONDS, but every time
        flushed_on.append(threading.current_thread().name)
        time.sleep(0.005)
        fdatasync(fd)

    monkeypatch.setattr(journal_connection.os, "fdatasync", slowish_fdatasync)
    for _ in range(4):
        await _publish(journal, queue)
    assert flushed_on[0] == "MainThread" and all(name.startswith("journal-flush") for name in flushed_on[2:])


async def test_on_a_slow_disk_a_commit_is_answered_only_after_its_flush_and_never_waits_for_a_checkpoint(
    journal: SqliteJournalStore, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the loop, the flush still comes before the answer (201 means durable); and it has a thread of its own,
    so a checkpoint running on the writer's thread (seconds on a slow disk) does not hold up every commit."""
    writer = journal._writer
    assert writer is not None
    writer._slow_disk = True
    checkpointing, end_checkpoint = threading.Event(), threading.Event()

    def long_checkpoint() -> None:
        checkpointing.set()
        end_checkpoint.wait(10)

    monkeypatch.setattr(writer.db, "checkpoint", long_checkpoint)
    writer._start_checkpoint()
    assert await asyncio.get_running_loop().run_in_executor(None, checkpointing.wait, 5)
    flushing, end_flush = threading.Event(), threading.Event()
    fdatasync = os.fdatasync

    def held_fdatasync(fd: int) -> None:
        flushing.set()
        end_flush.wait(10)
        fdatasync(fd)

    monkeypatch.setattr(journal_connection.os, "fdatasync", held_fdatasync)
    try:
        publishing = asyncio.create_task(_publish(journal, queue))
        assert await asyncio.get_running_loop().run_in_executor(None, flushing.wait, 5)  # beside the checkpoint
        await asyncio.sleep(0.1)
        assert not publishing.done()  # committed, not yet flushed: not answered
        end_flush.set()
        assert len(await asyncio.wait_for(publishing, 5)) == 1
        assert writer._checkpoint is not None  # the checkpoint is still running
    finally:
        end_flush.set()
        end_checkpoint.set()


async def test_a_writer_stopped_by_a_bug_answers_every_caller_instead_of_leaving_them_waiting(
    journal: SqliteJournalStore, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = journal._writer
    assert writer is not None
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def held_then_broken(batch: Any) -> None:
        entered.set()
        await go_on.wait()
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(writer, "_commit", held_then_broken)
    first = asyncio.ensure_future(_publish(journal, queue))
    await entered.wait()
    queued = asyncio.ensure_future(_publish(journal, queue))  # waits in the inbox behind the broken commit
    await asyncio.sleep(0)
    go_on.set()
    results = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 5)
    assert all(isinstance(r, JournalUnavailable) for r in results), results
    assert "unknown" in str(results[0]) and "not accepting" in str(results[1])
    assert not journal.healthy
    with pytest.raises(JournalUnavailable):
        await _publish(journal, queue)
