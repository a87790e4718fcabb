"""Messages of a partition being set up wait; nothing is dropped in the gap between faust
resuming the fetch and the worker reading the partition's checkpoint."""

from __future__ import annotations

import asyncio

from faust.types import TP

from processor.worker.assignment import AssignmentGate

TP0 = TP("spans", 0)


def test_a_message_waits_until_its_partition_is_set_up() -> None:
    async def scenario() -> list[str]:
        gate = AssignmentGate()
        order: list[str] = []

        async def consume() -> None:
            await gate.wait(TP0)
            order.append("handled")

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        order.append("set up")
        gate.open([TP0])
        await task
        return order

    assert asyncio.run(scenario()) == ["set up", "handled"]


def test_an_open_partition_does_not_wait_and_a_rebalance_releases_waiters() -> None:
    async def scenario() -> tuple[bool, bool]:
        gate = AssignmentGate()
        gate.open([TP0])
        await asyncio.wait_for(gate.wait(TP0), 1)  # no wait at all
        gate.close_all()
        assert not gate.is_open(TP0)
        task = asyncio.create_task(gate.wait(TP0))
        await asyncio.sleep(0.01)
        waiting = not task.done()
        gate.close_all()  # the next rebalance: the waiter goes on (and drops its message)
        await asyncio.wait_for(task, 1)
        return waiting, gate.is_open(TP0)

    assert asyncio.run(scenario()) == (True, False)
