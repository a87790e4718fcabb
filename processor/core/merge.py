"""Finalize: merge the partials of every source partition into final window rollups.

``RollupMerger`` keeps, per (series, window), the latest partial of each source partition (a
replayed partial replaces its twin, so nothing is counted twice) and each partition's progress.
A window is final once every source partition has closed it, or, when some partition stays
silent, ``max_wait_ms`` of wall-clock time after its first partial arrived; such a window is
marked incomplete.

After a restart the merger replays its input from the committed offset. ``finalized_until``
(stored with the commit) says which windows were already written: a partial for one of them
is the twin of one already merged, re-sent by a replay of aggregate, and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from processor.core.aggregate import WindowAggregate
from processor.core.rollup import FinalRollup, PartialRollup, PartitionProgress, SeriesKey


@dataclass(slots=True)
class _PendingWindow:
    window_size_ms: int
    first_seen_ms: int
    min_offset: int
    partials: dict[int, PartialRollup] = field(default_factory=dict)


class RollupMerger:
    def __init__(self, *, source_partitions: int, max_wait_ms: int) -> None:
        if source_partitions < 1:
            raise ValueError("source_partitions must be at least 1")
        self._source_partitions = source_partitions
        self._max_wait_ms = max_wait_ms
        self._pending: dict[tuple[SeriesKey, int], _PendingWindow] = {}
        self._closed_until: dict[int, int] = {}
        self.finalized_until_ms: int | None = None
        # windows written incomplete (max wait), kept until every partition has passed them
        self._incomplete: dict[tuple[SeriesKey, int], _PendingWindow] = {}
        self.ignored_replays = 0

    @property
    def source_partitions(self) -> int:
        return self._source_partitions

    def add_partial(self, partial: PartialRollup, now_ms: int, offset: int = 0) -> bool:
        """Keep ``partial`` (replacing its twin); False when its window was written already."""
        finalized = self.finalized_until_ms
        if finalized is not None and partial.window_end_ms <= finalized:
            self.ignored_replays += 1
            return False
        key = (partial.series, partial.window_start_ms)
        pending = self._pending.get(key)
        if pending is None and key in self._incomplete:
            # A straggler for a window written incomplete: merge again with what was written,
            # so the correction carries every partition's spans, never just the straggler's.
            pending = self._pending[key] = self._incomplete.pop(key)
            pending.first_seen_ms = now_ms
            pending.min_offset = offset  # the earlier partials' offsets may be committed
        if pending is None:
            pending = self._pending[key] = _PendingWindow(partial.window_size_ms, now_ms, offset)
        elif offset < pending.min_offset:
            pending.min_offset = offset
        pending.partials[partial.source_partition] = partial
        return True

    def min_pending_offset(self) -> int | None:
        """Offset of the oldest input record of a window not yet final: safe to commit below."""
        if not self._pending:
            return None
        return min(pending.min_offset for pending in self._pending.values())

    def add_progress(self, progress: PartitionProgress) -> None:
        previous = self._closed_until.get(progress.source_partition)
        if previous is None or progress.closed_until_ms > previous:
            self._closed_until[progress.source_partition] = progress.closed_until_ms

    def all_closed_until(self) -> int | None:
        """The time before which every source partition has closed its windows."""
        if len(self._closed_until) < self._source_partitions:
            return None
        return min(self._closed_until.values())

    def ready(self, now_ms: int) -> list[FinalRollup]:
        """Pop and return every window that is final now, oldest first."""
        closed = self.all_closed_until()
        if closed is not None and (
            self.finalized_until_ms is None or closed > self.finalized_until_ms
        ):
            # Every window ending by ``closed`` is final below (or had no partial at all).
            self.finalized_until_ms = closed
            for key in [
                k for k in self._incomplete if k[1] + self._incomplete[k].window_size_ms <= closed
            ]:
                del self._incomplete[key]
        finals: list[FinalRollup] = []
        for key in sorted(self._pending, key=lambda k: (k[1], k[0].agent, k[0].dimensions)):
            series, start = key
            pending = self._pending[key]
            end = start + pending.window_size_ms
            complete = closed is not None and end <= closed
            if not complete and now_ms - pending.first_seen_ms < self._max_wait_ms:
                continue
            del self._pending[key]
            if not complete:
                self._incomplete[key] = pending
            merged = WindowAggregate()
            for source in sorted(pending.partials):
                merged.merge(pending.partials[source].aggregate)
            finals.append(
                FinalRollup(
                    series=series,
                    window_start_ms=start,
                    window_size_ms=pending.window_size_ms,
                    aggregate=merged,
                    source_partitions=tuple(sorted(pending.partials)),
                    complete=complete,
                )
            )
        return finals

    @property
    def pending_windows(self) -> int:
        return len(self._pending)
