"""Stage 1 for one source partition: attribute spans, aggregate per window, close windows.

``PartitionAggregator`` is pure: the worker feeds it decoded spans with their offsets and the
wall-clock time, and asks it to ``advance``; it answers with the partial rollups of the windows
the watermark has passed and a progress mark. A window closes once the watermark has passed its
end and no span in it still waits for its parent's attribution. A span whose window has closed
is counted in ``late_spans`` of the window currently open, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from processor.core.aggregate import WindowAggregate
from processor.core.attribution import AttributedSpan, TraceAssembler
from processor.core.rollup import PartialRollup, PartitionProgress, SeriesKey
from processor.core.semconv import OVERFLOW_SERIES
from processor.core.spans import SpanRecord
from processor.core.windows import Watermark, window_start


@dataclass(slots=True)
class PartitionStats:
    spans: int = 0
    late_spans: int = 0
    overflow_spans: int = 0
    windows_closed: int = 0


@dataclass(slots=True)
class AdvanceResult:
    partials: list[PartialRollup]
    progress: PartitionProgress | None  # None while nothing has closed yet


class PartitionAggregator:
    def __init__(
        self,
        partition: int,
        *,
        window_size_ms: int,
        allowed_lateness_ms: int,
        idle_timeout_ms: int,
        max_series_per_window: int = 1_000,
        assembler: TraceAssembler | None = None,
    ) -> None:
        if window_size_ms < 1:
            raise ValueError("window_size_ms must be positive")
        if max_series_per_window < 1:
            raise ValueError("max_series_per_window must be at least 1")
        self.partition = partition
        self._size = window_size_ms
        self._max_series = max_series_per_window
        self.watermark = Watermark(
            allowed_lateness_ms=allowed_lateness_ms, idle_timeout_ms=idle_timeout_ms
        )
        self.assembler = assembler or TraceAssembler(attribution_wait_ms=allowed_lateness_ms)
        self._windows: dict[int, dict[SeriesKey, WindowAggregate]] = {}
        self._window_min_offset: dict[int, int] = {}
        self.closed_until_ms: int | None = None
        self.stats = PartitionStats()

    def add(self, offset: int, spans: Iterable[SpanRecord], now_ms: int) -> None:
        watermark = self.watermark
        watermark.touch(now_ms)
        assembler = self.assembler
        for span in spans:
            watermark.observe(span.end_ms, now_ms)
            for attributed in assembler.add(span, offset):
                self._aggregate(attributed)

    def _aggregate(self, item: AttributedSpan) -> None:
        span = item.span
        self.stats.spans += 1
        start = span.end_ms - span.end_ms % self._size
        closed = self.closed_until_ms
        series = SeriesKey(item.agent, span.dimensions)
        if closed is not None and start + self._size <= closed:
            # Its window is out already: count it where it arrived, in the open window.
            self.stats.late_spans += 1
            head = max(self.watermark.max_event_ms or closed, closed)
            self._series(window_start(head, self._size), series, item.offset).late_spans += 1
            return
        self._series(start, series, item.offset).add(
            trace_id=span.trace_id,
            duration_ns=span.end_ns - span.start_ns,
            is_error=span.is_error,
            is_invocation=item.is_invocation,
            is_llm=span.is_llm,
            tokens_prompt=span.tokens_prompt,
            tokens_completion=span.tokens_completion,
            tokens_total=span.tokens_total,
            cost_nanos=span.cost_nanos,
        )

    def _series(self, start: int, series: SeriesKey, offset: int) -> WindowAggregate:
        window = self._windows.get(start)
        if window is None:
            window = self._windows[start] = {}
            self._window_min_offset[start] = offset
        elif offset < self._window_min_offset[start]:
            self._window_min_offset[start] = offset
        aggregate = window.get(series)
        if aggregate is None:
            if len(window) >= self._max_series:
                # Past the cardinality limit every new series shares one overflow series.
                self.stats.overflow_spans += 1
                series = SeriesKey(
                    OVERFLOW_SERIES, tuple(OVERFLOW_SERIES for _ in series.dimensions)
                )
                aggregate = window.get(series)
            if aggregate is None:
                aggregate = window[series] = WindowAggregate()
        return aggregate

    def advance(self, now_ms: int, *, caught_up: bool) -> AdvanceResult:
        """Move the watermark (idle advance) and close every window it has passed."""
        watermark_ms = self.watermark.tick(now_ms, caught_up=caught_up)
        if watermark_ms is None:
            return AdvanceResult([], None)
        for attributed in self.assembler.expire(watermark_ms):
            self._aggregate(attributed)
        candidate = window_start(watermark_ms, self._size)
        waiting_end = self.assembler.earliest_pending_end_ms()
        if waiting_end is not None:
            candidate = min(candidate, window_start(waiting_end, self._size))
        if self.closed_until_ms is not None and candidate <= self.closed_until_ms:
            return AdvanceResult([], PartitionProgress(self.partition, self.closed_until_ms))
        self.closed_until_ms = candidate
        partials: list[PartialRollup] = []
        for start in sorted(self._windows):
            if start + self._size > candidate:
                break
            for series, aggregate in sorted(
                self._windows.pop(start).items(),
                key=lambda item: (item[0].agent, item[0].dimensions),
            ):
                partials.append(PartialRollup(series, start, self._size, self.partition, aggregate))
            del self._window_min_offset[start]
            self.stats.windows_closed += 1
        return AdvanceResult(partials, PartitionProgress(self.partition, candidate))

    def min_open_offset(self) -> int | None:
        """Smallest source offset that fed a window or a span not yet written out."""
        offsets = list(self._window_min_offset.values())
        pending = self.assembler.min_pending_offset()
        if pending is not None:
            offsets.append(pending)
        return min(offsets) if offsets else None

    @property
    def open_windows(self) -> list[int]:
        return sorted(self._windows)
