"""A mergeable latency sketch with a relative-error guarantee (DDSketch).

The bucket mapping is DDSketch's own (``ddsketch.mapping.LogarithmicMapping``); the state is a
plain ``{bucket key: count}`` dict so that it serialises to JSON byte for byte the same way
every time and merges by adding counts. Merging is therefore exactly associative and
commutative, which is what lets partials from many partitions and workers combine into the
same final numbers in any order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY = 0.01
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)


@dataclass(slots=True)
class LatencySketch:
    """Counts of positive values per logarithmic bucket, plus an exact zero bucket."""

    bins: dict[int, int] = field(default_factory=dict)
    zero_count: int = 0

    @property
    def count(self) -> int:
        return self.zero_count + sum(self.bins.values())

    def add(self, value: float) -> None:
        if value <= _MAPPING.min_possible:
            self.zero_count += 1
            return
        key = _MAPPING.key(value)
        self.bins[key] = self.bins.get(key, 0) + 1

    def merge(self, other: LatencySketch) -> None:
        self.zero_count += other.zero_count
        bins = self.bins
        for key, count in other.bins.items():
            bins[key] = bins.get(key, 0) + count

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` within 1% relative error; None when empty.

        Uses the lower rank ``q * (n - 1)``, the rule DDSketch uses, so the answer is within 1%
        of the exact order statistic ``sorted(values)[floor(q * (n - 1))]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        total = self.count
        if total == 0:
            return None
        rank = q * (total - 1)
        if rank < self.zero_count:
            return 0.0
        seen = self.zero_count
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen > rank:
                return float(_MAPPING.value(key))
        return float(_MAPPING.value(max(self.bins)))  # pragma: no cover - rank < total always

    def to_state(self) -> list[list[int]]:
        """Plain, sorted state: ``[[zero_count], [key, count], ...]``."""
        return [[self.zero_count], *([key, self.bins[key]] for key in sorted(self.bins))]

    @classmethod
    def from_state(cls, state: Iterable[list[int]]) -> LatencySketch:
        items = list(state)
        if not items:
            return cls()
        zero = items[0][0]
        return cls(bins={key: count for key, count in items[1:]}, zero_count=zero)
