"""The races behind test_redis_loss's "rebuild racing publishes", made deterministic in process.

A rebuild holds the gate exclusively and reads the journal. A publish (or a delivery) that commits to the journal
while the rebuild waits, and changes Redis after it, would leave Redis different from the journal (the id pushed
twice, or put back in ready while it is leased): DESIGN.md invariant 7. The broker holds the shared gate across
each commit and its Redis change, so a rebuild comes wholly before or after.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.models import NewMessage, QueueSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


async def test_a_publish_committed_while_a_rebuild_waits_is_in_ready_once(broker: Any) -> None:
    await broker.create_queue("race", QueueSettings(), "test")
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold_the_gate() -> None:  # an ordinary Redis change in progress (an ack's release, say)
        async with broker.gate.shared():
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_the_gate())
    await holding.wait()
    rebuild = asyncio.create_task(broker.recovery.reconcile())  # the watcher found Redis lost: waits for the gate
    await asyncio.sleep(0.05)
    publish = asyncio.create_task(broker.publish("race", [NewMessage(content='{"uid": "raced"}')], "test"))
    await asyncio.sleep(0.2)  # the publish is under way while the rebuild waits for the gate

    release.set()
    await holder
    await asyncio.wait_for(rebuild, 10)
    [result] = await asyncio.wait_for(publish, 10)

    ready = (await broker.redis.snapshot("race")).ready
    differences = await broker.recovery.differences()
    assert ready.count(result.message_id) == 1 and differences == [], (
        f"ready holds message {result.message_id} {ready.count(result.message_id)} times; journal check: {differences}"
    )


async def test_a_delivery_taken_while_a_rebuild_waits_keeps_redis_equal_to_the_journal(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same window in consume: Redis moves the id to processing (under the gate), the gate is let go, and the
    delivery is journaled (under the gate again). A rebuild that gets the gate in between still sees the message
    pending, so it puts the id back in ready; the journal then records the delivery under a lease Redis lacks."""
    await broker.create_queue("race", QueueSettings(), "test")
    [published] = await broker.publish("race", [NewMessage(content='{"uid": "raced"}')], "test")
    real_take = broker.redis.take
    rebuilds: list[asyncio.Task[Any]] = []

    async def take_while_a_rebuild_starts(*args: Any, **kwargs: Any) -> list[int]:
        ids: list[int] = await real_take(*args, **kwargs)
        rebuilds.append(asyncio.create_task(broker.recovery.reconcile()))  # the watcher found Redis lost
        await asyncio.sleep(0.05)  # it now waits for this shared holder to leave
        return ids

    monkeypatch.setattr(broker.redis, "take", take_while_a_rebuild_starts)
    [delivery] = await asyncio.wait_for(broker.consume("race", actor="test"), 10)
    monkeypatch.undo()
    await asyncio.wait_for(rebuilds[0], 10)

    assert delivery.message.id == published.message_id
    differences = await broker.recovery.differences()
    snapshot = await broker.redis.snapshot("race")
    assert differences == [], (
        f"after a delivery that straddled a rebuild, Redis holds ready={snapshot.ready} "
        f"processing={snapshot.processing} leases={snapshot.leases}; journal check: {differences}"
    )
