"""Setting a newly assigned partition up: hold its messages back until then, and say where
reading resumed.

Faust resumes fetching a newly assigned partition (its recovery service seeks to the committed
offset and resumes the flow) before the ``on_partitions_assigned`` signal reaches the worker's
handler, which still has to read the commit's checkpoint. A message that arrives in between
must wait, not be dropped: dropping it would let a later commit pass over it, and its spans
would be lost. A message of a partition this worker no longer holds is dropped as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from faust.types import TP

log = logging.getLogger(__name__)

SETUP_WAIT_S = 60.0  # reading a commit's checkpoint takes well under a second


class AssignmentGate:
    def __init__(self) -> None:
        self._open: set[TP] = set()
        self._waiting: dict[TP, asyncio.Event] = {}

    def is_open(self, tp: TP) -> bool:
        return tp in self._open

    def open(self, tps: Iterable[TP]) -> None:
        """``tps`` are set up: their messages may go on."""
        for tp in tps:
            self._open.add(tp)
            event = self._waiting.pop(tp, None)
            if event is not None:
                event.set()

    def close_all(self) -> None:
        """A rebalance started: every partition is set up again when (re)assigned."""
        self._open.clear()
        for event in self._waiting.values():
            event.set()  # the waiters find their partition gone and drop their message
        self._waiting.clear()

    async def wait(self, tp: TP) -> None:
        """Wait until ``tp`` is set up, or a rebalance intervenes, or the wait times out."""
        if tp in self._open:
            return
        event = self._waiting.setdefault(tp, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), SETUP_WAIT_S)
            return
        log.error("%s was assigned but not set up within %.0f s", tp, SETUP_WAIT_S)


class ResumeWatch:
    """Says where a role resumed each partition it was assigned, against where it should have.

    The first record handled after an assignment should be the committed one, or the
    partition's first record when nothing was committed. A later one means the records in
    between never reached this worker: retention removed them before they were read, or the
    consumer skipped them (see docs/operations.md, "What a rebalance does"). On a compacted
    topic a later first record is normal, so there the line stays informational.
    """

    def __init__(self, logger: logging.Logger, role: str, *, compacted: bool = False) -> None:
        self._log = logger
        self._role = role
        self._compacted = compacted
        self._pending: dict[int, int | None] = {}

    def expect(self, partition: int, committed: int | None) -> None:
        """``partition`` was assigned; ``committed`` is the group's offset (None: no commit)."""
        self._pending[partition] = committed

    def forget(self, partition: int) -> None:
        self._pending.pop(partition, None)

    def handled(self, partition: int, offset: int) -> None:
        """Note a handled record; only the first one after an assignment is logged."""
        if partition not in self._pending:
            return
        committed = self._pending.pop(partition)
        extra = {"partition": partition, "offset": offset}
        if offset > (committed or 0) and not self._compacted:
            self._log.warning(
                "%s resumed partition %d at offset %d, after its %s: "
                "the records in between were not read",
                self._role,
                partition,
                offset,
                "first record (no commit)"
                if committed is None
                else f"committed offset {committed}",
                extra=extra,
            )
        else:
            self._log.info(
                "%s resumed partition %d at offset %d (committed: %s)",
                self._role,
                partition,
                offset,
                committed,
                extra=extra,
            )
