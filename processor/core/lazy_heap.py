"""A min-heap over keys whose value changes, for "the earliest X still held" questions.

The assembler and the sampler ask after every message which held trace ends first, or was
first seen first, or is past its TTL. A scan of every held trace would not do, and a heap
cannot update an entry in place. ``LazyHeap`` pushes a new entry on every change and skips, when
it reaches them, the entries that no longer hold: those whose key is gone, or whose value moved
on. The owner keeps the live values (in its own records); the heap only asks for them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_SLACK = 1_024  # stale entries tolerated beyond 3 per live key before a rebuild


class LazyHeap(Generic[K]):
    """``(value, key)`` entries; an entry counts while ``current(key) == value``.

    ``current`` gives a key's live value (None: the key is gone); ``live`` gives every live
    ``(value, key)`` and ``count`` how many there are, for a rebuild when stale entries
    outnumber live ones four to one.
    """

    __slots__ = ("_check_at", "_count", "_current", "_heap", "_live")

    def __init__(
        self,
        current: Callable[[K], int | None],
        live: Callable[[], Iterable[tuple[int, K]]],
        count: Callable[[], int],
    ) -> None:
        self._heap: list[tuple[int, K]] = []
        self._current = current
        self._live = live
        self._count = count
        self._check_at = _SLACK  # the length at which to count the live keys again

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, value: int, key: K) -> None:
        heap = self._heap
        heapq.heappush(heap, (value, key))
        if len(heap) > self._check_at:
            # Counting live keys may cost a call per push: do it only past the last bound.
            bound = 4 * self._count() + _SLACK
            if len(heap) > bound:
                heap[:] = list(self._live())
                heapq.heapify(heap)
                bound = 4 * len(heap) + _SLACK
            self._check_at = bound

    def peek(self) -> int | None:
        """The smallest live value, if any (stale entries in front are dropped)."""
        heap = self._heap
        current = self._current
        while heap:
            value, key = heap[0]
            if current(key) == value:
                return value
            heapq.heappop(heap)
        return None

    def pop_through(self, limit: int) -> Iterator[K]:
        """Each live key whose value is at most ``limit``, smallest first, taken out.

        A key is checked as it is reached, so the caller may drop keys while iterating.
        """
        heap = self._heap
        current = self._current
        while heap and heap[0][0] <= limit:
            value, key = heapq.heappop(heap)
            if current(key) == value:
                yield key
