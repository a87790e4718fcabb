"""A min-heap over keys whose value changes, for "the earliest X still held" questions.

The assembler and the sampler ask after every message which held trace ends first, or was
first seen first, or is past its TTL. A scan of every held trace would not do, and a heap
cannot update an entry in place. ``LazyHeap`` pushes a new entry on every change and skips, when
it reaches them, the entries that no longer hold: those whose key is gone, or whose value moved
on. The owner keeps the live values in its own records; the heap reads them there.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

_SLACK = 1_024  # stale entries tolerated beyond 3 per live key before a rebuild


class LazyHeap(Generic[K, R]):
    """``(value, key)`` entries over the owner's ``records``; an entry counts while
    ``value_of(records[key]) == value``. Rebuilt from ``records`` when stale entries outnumber
    live ones four to one.
    """

    __slots__ = ("_check_at", "_heap", "_records", "_value_of")

    def __init__(self, records: Mapping[K, R], value_of: Callable[[R], int]) -> None:
        self._heap: list[tuple[int, K]] = []
        self._records = records
        self._value_of = value_of
        self._check_at = _SLACK  # the length at which to count the live keys again

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, value: int, key: K) -> None:
        heap = self._heap
        heapq.heappush(heap, (value, key))
        if len(heap) > self._check_at:
            bound = 4 * len(self._records) + _SLACK
            if len(heap) > bound:
                value_of = self._value_of
                heap[:] = [(value_of(record), k) for k, record in self._records.items()]
                heapq.heapify(heap)
                bound = 4 * len(heap) + _SLACK
            self._check_at = bound

    def _is_live(self, value: int, key: K) -> bool:
        record = self._records.get(key)
        return record is not None and self._value_of(record) == value

    def peek(self) -> int | None:
        """The smallest live value, if any (stale entries in front are dropped)."""
        heap = self._heap
        while heap:
            value, key = heap[0]
            if self._is_live(value, key):
                return value
            heapq.heappop(heap)
        return None

    def pop_through(self, limit: int) -> Iterator[K]:
        """Each live key whose value is at most ``limit``, smallest first, taken out.

        A key is checked as it is reached, so the caller may drop keys while iterating.
        """
        heap = self._heap
        while heap and heap[0][0] <= limit:
            value, key = heapq.heappop(heap)
            if self._is_live(value, key):
                yield key
