"""Messages of a partition being set up wait; nothing is dropped in the gap between faust
resuming the fetch and the worker reading the partition's checkpoint. Where reading resumed
is logged, loudly when records were skipped."""

from __future__ import annotations

import asyncio
import logging

import pytest
from faust.types import TP

from processor.worker.assignment import AssignmentGate, ResumeWatch

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


# Where reading resumed after an assignment: what an operator reads to tell a skipped
# stretch of a partition from a clean resume.


def _resume_lines(
    caplog: pytest.LogCaptureFixture, handled: list[tuple[int, int]], *, compacted: bool = False
) -> list[tuple[str, str]]:
    watch = ResumeWatch(logging.getLogger("resume-test"), role="aggregate", compacted=compacted)
    watch.expect(0, None)
    watch.expect(1, 40)
    with caplog.at_level(logging.INFO, logger="resume-test"):
        for partition, offset in handled:
            watch.handled(partition, offset)
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_a_partition_resumed_at_its_commit_or_its_start_is_an_info_line_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = _resume_lines(caplog, [(0, 0), (1, 40), (0, 1), (1, 41), (1, 42)])

    assert lines == [
        ("INFO", "aggregate resumed partition 0 at offset 0 (committed: None)"),
        ("INFO", "aggregate resumed partition 1 at offset 40 (committed: 40)"),
    ]


def test_a_partition_resumed_past_its_commit_or_its_start_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = _resume_lines(caplog, [(0, 188), (1, 52)])

    assert [level for level, _ in lines] == ["WARNING", "WARNING"]
    assert "partition 0 at offset 188, after its first record (no commit)" in lines[0][1]
    assert "partition 1 at offset 52, after its committed offset 40" in lines[1][1]


def test_on_a_compacted_topic_a_later_first_record_is_only_informational(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = _resume_lines(caplog, [(0, 188), (1, 52)], compacted=True)

    assert [level for level, _ in lines] == ["INFO", "INFO"]


def test_a_new_assignment_is_watched_again_and_a_revocation_forgets_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = ResumeWatch(logging.getLogger("resume-test"), role="finalize")
    with caplog.at_level(logging.INFO, logger="resume-test"):
        watch.expect(3, 10)
        watch.forget(3)
        watch.handled(3, 99)  # revoked before its first record: nothing to say
        watch.expect(3, 10)
        watch.handled(3, 10)

    assert [r.getMessage() for r in caplog.records] == [
        "finalize resumed partition 3 at offset 10 (committed: 10)"
    ]
