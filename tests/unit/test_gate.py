"""The shared/exclusive gate around Redis changes."""

from __future__ import annotations

import asyncio

import pytest

from app.gate import Gate


async def _settle() -> None:
    """Let every runnable task run until it blocks."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _hold_shared(gate: Gate, entered: asyncio.Event, leave: asyncio.Event, log: list[str], name: str) -> None:
    async with gate.shared():
        log.append(f"{name} in")
        entered.set()
        await leave.wait()
        log.append(f"{name} out")


async def test_shared_holders_run_concurrently() -> None:
    gate = Gate()
    inside = 0
    most = 0
    all_in = asyncio.Event()

    async def holder() -> None:
        nonlocal inside, most
        async with gate.shared():
            inside += 1
            most = max(most, inside)
            if inside == 5:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 5)
            inside -= 1

    await asyncio.gather(*(holder() for _ in range(5)))

    assert most == 5


async def test_exclusive_waits_for_shared_holders_and_holds_back_new_ones() -> None:
    gate = Gate()
    log: list[str] = []
    a_in, a_leave = asyncio.Event(), asyncio.Event()
    b_in, b_leave = asyncio.Event(), asyncio.Event()
    x_in, x_leave = asyncio.Event(), asyncio.Event()

    async def exclusive() -> None:
        async with gate.exclusive():
            log.append("X in")
            x_in.set()
            await x_leave.wait()
            log.append("X out")

    a = asyncio.create_task(_hold_shared(gate, a_in, a_leave, log, "A"))
    await asyncio.wait_for(a_in.wait(), 5)
    x = asyncio.create_task(exclusive())
    await _settle()
    assert not x_in.is_set(), "exclusive entered while a shared holder was inside"

    b = asyncio.create_task(_hold_shared(gate, b_in, b_leave, log, "B"))
    await _settle()
    assert not b_in.is_set(), "a new shared holder overtook a waiting exclusive one"

    a_leave.set()
    await asyncio.wait_for(x_in.wait(), 5)
    await _settle()
    assert not b_in.is_set(), "a shared holder entered while exclusive was held"

    x_leave.set()
    await asyncio.wait_for(b_in.wait(), 5)
    b_leave.set()
    await asyncio.wait_for(asyncio.gather(a, x, b), 5)

    assert log == ["A in", "A out", "X in", "X out", "B in", "B out"]


async def test_exclusive_holders_exclude_each_other() -> None:
    gate = Gate()
    inside = 0
    most = 0

    async def exclusive() -> None:
        nonlocal inside, most
        async with gate.exclusive():
            inside += 1
            most = max(most, inside)
            await _settle()
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(exclusive() for _ in range(4))), 5)

    assert most == 1


async def test_an_exclusive_holder_that_raises_opens_the_gate_again() -> None:
    gate = Gate()

    with pytest.raises(RuntimeError):
        async with gate.exclusive():
            raise RuntimeError("rebuild failed")

    async def shared() -> str:
        async with gate.shared():
            return "entered"

    assert await asyncio.wait_for(shared(), 5) == "entered"


async def test_a_cancelled_exclusive_waiter_does_not_hold_back_shared_holders() -> None:
    gate = Gate()
    log: list[str] = []
    a_in, a_leave = asyncio.Event(), asyncio.Event()
    b_in, b_leave = asyncio.Event(), asyncio.Event()

    async def exclusive() -> None:
        async with gate.exclusive():
            log.append("X in")

    a = asyncio.create_task(_hold_shared(gate, a_in, a_leave, log, "A"))
    await asyncio.wait_for(a_in.wait(), 5)
    x = asyncio.create_task(exclusive())
    await _settle()
    b = asyncio.create_task(_hold_shared(gate, b_in, b_leave, log, "B"))
    await _settle()
    assert not b_in.is_set()

    x.cancel()  # e.g. the client of a purge went away while it waited
    await asyncio.gather(x, return_exceptions=True)

    try:
        # Nothing exclusive is held or wanted any more: B is compatible with A and should enter now,
        # not only once A happens to leave.
        await asyncio.wait_for(b_in.wait(), 2)
    finally:
        a_leave.set()
        b_leave.set()
        await asyncio.wait_for(asyncio.gather(a, b), 5)
    assert log.index("B in") < log.index("A out")
