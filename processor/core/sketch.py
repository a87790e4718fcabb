"""A mergeable latency sketch with a relative-error guarantee (DDSketch).

The bucket mapping is DDSketch's own (``ddsketch.mapping.LogarithmicMapping``); the state is a
plain ``{bucket key: count}`` dict so that it serialises to JSON byte for byte the same way
every time and merges by adding counts. Merging is therefore exactly associative and
commutative, which is what lets partials from many partitions and workers combine into the
same final numbers in any order.

Values can carry a weight above one: the adjusted count of a span that an upstream sampler
kept (OpenTelemetry's ``th``). The part above one is kept apart, in millionths
(``WEIGHT_ONE``), so the plain counts stay exact integers and a sketch without upstream
sampling is exactly what it would be without this feature.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY = 0.01
WEIGHT_ONE = 1_000_000  # weights are integer millionths, so sums merge exactly in any order
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)


@dataclass(slots=True)
class LatencySketch:
    """Counts of positive values per logarithmic bucket, plus an exact zero bucket."""

    bins: dict[int, int] = field(default_factory=dict)
    zero_count: int = 0
    # weight above one per bucket, in millionths; empty without upstream sampling
    extra_bins: dict[int, int] = field(default_factory=dict)
    zero_extra: int = 0

    @property
    def count(self) -> int:
        return self.zero_count + sum(self.bins.values())

    def add(self, value: float, extra_weight: int = 0) -> None:
        """Count ``value`` once, plus ``extra_weight`` millionths (adjusted count minus one)."""
        if value <= _MAPPING.min_possible:
            self.zero_count += 1
            self.zero_extra += extra_weight
            return
        key = _MAPPING.key(value)
        self.bins[key] = self.bins.get(key, 0) + 1
        if extra_weight:
            self.extra_bins[key] = self.extra_bins.get(key, 0) + extra_weight

    def merge(self, other: LatencySketch) -> None:
        self.zero_count += other.zero_count
        self.zero_extra += other.zero_extra
        bins = self.bins
        for key, count in other.bins.items():
            bins[key] = bins.get(key, 0) + count
        extra = self.extra_bins
        for key, weight in other.extra_bins.items():
            extra[key] = extra.get(key, 0) + weight

    @property
    def weighted(self) -> bool:
        return bool(self.zero_extra or self.extra_bins)

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` within 1% relative error; None when empty.

        Uses the lower rank ``q * (n - 1)``, the rule DDSketch uses, so the answer is within 1%
        of the exact order statistic ``sorted(values)[floor(q * (n - 1))]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        if self.weighted:
            return self._weighted_quantile(q)
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

    def _weighted_quantile(self, q: float) -> float | None:
        """The same lower-rank rule over weights: one unit is ``WEIGHT_ONE``."""
        zero = self.zero_count * WEIGHT_ONE + self.zero_extra
        weights = {
            key: count * WEIGHT_ONE + self.extra_bins.get(key, 0)
            for key, count in self.bins.items()
        }
        total = zero + sum(weights.values())
        rank = q * (total - WEIGHT_ONE)
        if rank < zero:
            return 0.0
        seen = zero
        for key in sorted(weights):
            seen += weights[key]
            if seen > rank:
                return float(_MAPPING.value(key))
        return float(_MAPPING.value(max(weights)))  # pragma: no cover - rank < total always

    def extra_state(self) -> list[list[int]] | None:
        """The weights above one, like ``to_state``; None without upstream sampling."""
        if not self.weighted:
            return None
        extra = self.extra_bins
        return [[self.zero_extra], *([key, extra[key]] for key in sorted(extra))]

    def to_state(self) -> list[list[int]]:
        """Plain, sorted state: ``[[zero_count], [key, count], ...]``."""
        return [[self.zero_count], *([key, self.bins[key]] for key in sorted(self.bins))]

    @classmethod
    def from_state(
        cls, state: Iterable[list[int]], extra: Iterable[list[int]] | None = None
    ) -> LatencySketch:
        sketch = cls()
        items = list(state)
        if items:
            sketch.zero_count = items[0][0]
            sketch.bins = {key: count for key, count in items[1:]}
        extra_items = list(extra or ())
        if extra_items:
            sketch.zero_extra = extra_items[0][0]
            sketch.extra_bins = {key: weight for key, weight in extra_items[1:]}
        return sketch
