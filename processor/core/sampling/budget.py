"""A total budget of spans per second of event time, in slots a replay can rebuild.

Event time here is the time a span counts at: its end, or for a span late on arrival the start
of the window it is counted in (``SampledSpan.counted_ms``). Each slot of ``slot_ms`` (one
second, longer when the budget holds less than one span a second: a slot always holds at
least one span) admits probabilistic traces while it has used less than ``capacity`` spans;
the sampler charges it every span of the traces it lets through, and of the traces its rules
keep, which are let through whatever the budget says.

A slot belongs to event time, not to the moment a decision falls, so that what charges a slot
is the trace of a span counted in it; which span that is does not depend on where a replay
starts. Each slot also notes the smallest first offset (the offset where the partition first
saw the trace) of every trace with a span counted in it: a replay that starts at or before it
sees every trace that could charge the slot, from its first span, and so fills the slot as
this run did.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    used: int  # spans charged
    first_offset: int  # smallest first offset of a trace with a span counted in the slot


class SpanBudget:
    def __init__(self, spans_per_second: float) -> None:
        if (
            isinstance(spans_per_second, bool)
            or not isinstance(spans_per_second, int | float)
            or not math.isfinite(spans_per_second)
            or spans_per_second <= 0
        ):
            raise ValueError(f"spans_per_second must be above 0, got {spans_per_second!r}")
        self.slot_ms = 1_000 if spans_per_second >= 1 else math.ceil(1_000 / spans_per_second)
        self.capacity = spans_per_second * self.slot_ms / 1_000
        self._slots: dict[int, _Slot] = {}
        self._order: list[int] = []  # slot indexes, a min-heap: what to forget first
        self._floor = -(1 << 62)  # slots below this index are forgotten

    def slot_of(self, counted_ms: int) -> int:
        return counted_ms // self.slot_ms

    def note(self, slot: int, first_offset: int) -> None:
        """A span of a trace first seen at ``first_offset`` counts in ``slot``."""
        found = self._slots.get(slot)
        if found is None:
            self._slots[slot] = _Slot(0, first_offset)
            heapq.heappush(self._order, slot)
        elif first_offset < found.first_offset:
            found.first_offset = first_offset

    def admits(self, slot: int) -> bool:
        """Whether a probabilistic trace of ``slot`` may go: the slot has room left."""
        found = self._slots.get(slot)
        return found is None or found.used < self.capacity

    def charge(self, slot: int, spans: int = 1) -> None:
        """Count ``spans`` let through against ``slot`` (a forgotten slot takes nothing)."""
        found = self._slots.get(slot)
        if found is not None:
            found.used += spans

    def used(self, slot: int) -> int:
        found = self._slots.get(slot)
        return 0 if found is None else found.used

    def first_offset(self, slot: int) -> int | None:
        """The smallest first offset of a trace with a span counted in ``slot``."""
        found = self._slots.get(slot)
        return None if found is None else found.first_offset

    def forget_before(self, counted_ms: int) -> None:
        """Forget the slots wholly before ``counted_ms``: no decision will look at them again."""
        floor = self.slot_of(counted_ms)
        if floor <= self._floor:
            return
        self._floor = floor
        order, slots = self._order, self._slots
        while order and order[0] < floor:
            del slots[heapq.heappop(order)]

    def min_first_offset(self, counted_from_ms: int | None) -> int | None:
        """The smallest first offset noted in the slots from ``counted_from_ms`` on (all
        slots when None): where a replay must start to fill them as this run did."""
        floor = None if counted_from_ms is None else self.slot_of(counted_from_ms)
        offsets = [
            slot.first_offset
            for index, slot in self._slots.items()
            if floor is None or index >= floor
        ]
        return min(offsets) if offsets else None

    @property
    def slots(self) -> int:
        return len(self._slots)
