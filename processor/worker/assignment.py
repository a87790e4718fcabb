"""Hold back messages of a partition until the worker has set the partition up.

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
