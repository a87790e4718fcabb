"""A token bucket per agent, refilled by event time rather than by the wall clock.

Each agent's bucket holds at most one second's worth of spans (at least one span) and starts
full; it refills at ``spans_per_second`` as the event-time clock handed in moves forward. A
clock that moves back refills nothing. The same calls therefore give the same answers on any
machine and in any replay that starts from the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_MAX_IDLE_BUCKETS = 1_024  # past this many agents, full buckets are forgotten (a fresh one is full)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    refilled_at_ms: int


class AgentRateLimiter:
    def __init__(self, spans_per_second: float) -> None:
        if (
            isinstance(spans_per_second, bool)
            or not math.isfinite(spans_per_second)
            or spans_per_second <= 0
        ):
            raise ValueError(f"spans_per_second must be above 0, got {spans_per_second!r}")
        self._per_ms = spans_per_second / 1_000
        self.capacity = max(1.0, float(spans_per_second))
        self._buckets: dict[str, _Bucket] = {}

    def try_take(self, agent: str, now_ms: int) -> bool:
        """Take one span's token from ``agent``'s bucket at event time ``now_ms``, if it has one."""
        bucket = self._buckets.get(agent)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._forget_full(now_ms)
            bucket = self._buckets[agent] = _Bucket(self.capacity, now_ms)
        else:
            self._refill(bucket, now_ms)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def tokens(self, agent: str, now_ms: int) -> float:
        """Tokens ``agent`` would have at ``now_ms`` (for tests and status pages)."""
        bucket = self._buckets.get(agent)
        if bucket is None:
            return self.capacity
        elapsed = max(0, now_ms - bucket.refilled_at_ms)
        return min(self.capacity, bucket.tokens + elapsed * self._per_ms)

    def _refill(self, bucket: _Bucket, now_ms: int) -> None:
        elapsed = now_ms - bucket.refilled_at_ms
        if elapsed > 0:
            bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self._per_ms)
            bucket.refilled_at_ms = now_ms

    def _forget_full(self, now_ms: int) -> None:
        for agent in [a for a in self._buckets if self.tokens(a, now_ms) >= self.capacity]:
            del self._buckets[agent]

    @property
    def agents(self) -> int:
        return len(self._buckets)
