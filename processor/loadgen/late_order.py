"""Publish order with deliberate lateness: some traces go out after later ones.

`LateReorderer` is fed traces in event-time order and hands them back in publish order. A
trace picked as late (with probability ``fraction``) is held until a trace ending at least
``delay_ms`` after it has been fed, ``delay_ms`` drawn uniformly from ``1..max_delay_ms``;
whatever is still held at the end comes out in `drain`. Driven by the traces' own end times,
it works the same on the simulated clock and in real time.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Generic, Protocol, TypeVar


class HasEndMs(Protocol):
    @property
    def end_ms(self) -> int: ...


TraceT = TypeVar("TraceT", bound=HasEndMs)


class LateReorderer(Generic[TraceT]):
    """Holds back a fraction of traces. Each released trace comes with the delay it was given
    (0 for traces published in order)."""

    def __init__(self, *, fraction: float, max_delay_ms: int, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"late fraction must be between 0 and 1, got {fraction}")
        if max_delay_ms < 1:
            raise ValueError(f"max_delay_ms must be >= 1, got {max_delay_ms}")
        self._fraction = fraction
        self._max_delay_ms = max_delay_ms
        # Its own RNG: asking for lateness never changes the traces themselves.
        self._rng = random.Random(f"loadgen-late/{seed}")
        self._held: list[tuple[int, int, TraceT, int]] = []
        self._sequence = itertools.count()

    def push(self, trace: TraceT) -> list[tuple[TraceT, int]]:
        """Feed the next trace in event-time order; returns what to publish now, in order."""
        released = self._release_until(trace.end_ms)
        if self._fraction > 0 and self._rng.random() < self._fraction:
            delay_ms = self._rng.randint(1, self._max_delay_ms)
            heapq.heappush(
                self._held, (trace.end_ms + delay_ms, next(self._sequence), trace, delay_ms)
            )
        else:
            released.append((trace, 0))
        return released

    def drain(self) -> list[tuple[TraceT, int]]:
        """Everything still held, in release order."""
        return self._release_until(None)

    def _release_until(self, now_ms: int | None) -> list[tuple[TraceT, int]]:
        released: list[tuple[TraceT, int]] = []
        while self._held and (now_ms is None or self._held[0][0] <= now_ms):
            _, _, trace, delay_ms = heapq.heappop(self._held)
            released.append((trace, delay_ms))
        return released
