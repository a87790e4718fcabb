"""Records that travel from aggregate to finalize, and the final rollup finalize produces.

Partials are keyed by (agent, dimensions, window, source partition): a partial replayed after a
crash carries the same key and replaces its twin. Progress marks tell finalize how far each
source partition has closed its windows. Both serialise to canonical JSON (sorted keys), so a
partial rebuilt from the same spans is the same bytes. The schema is in ``schemas/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from processor.core.aggregate import WindowAggregate
from processor.core.windows import window_index

PARTIAL_KIND = "partial"
PROGRESS_KIND = "progress"
SCHEMA_VERSION = 1
ALL_AGENTS = "__all__"  # the series of every span of every agent


class SeriesKey(NamedTuple):
    # A tuple, not a dataclass: it is hashed for every span, and a tuple hashes in C.
    agent: str
    dimensions: tuple[str, ...] = ()


def dimension_items(names: Sequence[str], values: Sequence[str]) -> list[tuple[str, str]]:
    """A series' dimension values with their names (``dimension_<i>`` past the names known)."""
    return [
        (names[i] if i < len(names) else f"dimension_{i}", value) for i, value in enumerate(values)
    ]


def iso_ms(timestamp_ms: int) -> str:
    """``2024-05-01T00:00:00.000Z``"""
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Every span of every agent, whatever the dimensions: the system's totals.
ALL_SERIES = SeriesKey(ALL_AGENTS)


@dataclass(slots=True)
class PartialRollup:
    series: SeriesKey
    window_start_ms: int
    window_size_ms: int
    source_partition: int
    aggregate: WindowAggregate

    @property
    def window_end_ms(self) -> int:
        return self.window_start_ms + self.window_size_ms

    def key(self) -> bytes:
        # The agent leads the key so the default partitioner keeps one agent on one finalize
        # partition; the rest makes replays replace their twin in the compacted topic.
        return orjson.dumps(
            [
                self.series.agent,
                list(self.series.dimensions),
                self.window_start_ms,
                self.source_partition,
            ]
        )

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "kind": PARTIAL_KIND,
                "v": SCHEMA_VERSION,
                "agent": self.series.agent,
                "dimensions": list(self.series.dimensions),
                "window_start_ms": self.window_start_ms,
                "window_size_ms": self.window_size_ms,
                "source_partition": self.source_partition,
                "aggregate": self.aggregate.to_state(),
            },
            option=orjson.OPT_SORT_KEYS,
        )


@dataclass(slots=True, frozen=True)
class PartitionProgress:
    """Every window of ``source_partition`` that ends at or before ``closed_until_ms`` is out."""

    source_partition: int
    closed_until_ms: int

    def key(self) -> bytes:
        return orjson.dumps([PROGRESS_KIND, self.source_partition])

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "kind": PROGRESS_KIND,
                "v": SCHEMA_VERSION,
                "source_partition": self.source_partition,
                "closed_until_ms": self.closed_until_ms,
            },
            option=orjson.OPT_SORT_KEYS,
        )


def parse_stage_record(payload: bytes) -> PartialRollup | PartitionProgress:
    """Parse a record of the partials topic; raises ValueError on anything else."""
    document: dict[str, Any] = orjson.loads(payload)
    kind = document.get("kind")
    if kind == PROGRESS_KIND:
        return PartitionProgress(
            source_partition=int(document["source_partition"]),
            closed_until_ms=int(document["closed_until_ms"]),
        )
    if kind == PARTIAL_KIND:
        return PartialRollup(
            series=SeriesKey(document["agent"], tuple(document["dimensions"])),
            window_start_ms=int(document["window_start_ms"]),
            window_size_ms=int(document["window_size_ms"]),
            source_partition=int(document["source_partition"]),
            aggregate=WindowAggregate.from_state(document["aggregate"]),
        )
    raise ValueError(f"unknown record kind {kind!r}")


@dataclass(slots=True)
class FinalRollup:
    """One agent's (and dimensions') numbers for one window, ready for MLflow."""

    series: SeriesKey
    window_start_ms: int
    window_size_ms: int
    aggregate: WindowAggregate
    source_partitions: tuple[int, ...]
    complete: bool
    # The series' day so far after this window (``day/<metric>``), when it gets a point.
    day_metrics: dict[str, float] | None = None

    @property
    def window_end_ms(self) -> int:
        return self.window_start_ms + self.window_size_ms

    @property
    def step(self) -> int:
        return window_index(self.window_start_ms, self.window_size_ms)

    def metrics(self) -> dict[str, float]:
        values = self.aggregate.metrics()
        values["window_complete"] = 1.0 if self.complete else 0.0
        return values
