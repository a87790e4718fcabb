"""Aggregate for one source partition: attribute spans, aggregate per window, close windows.

``PartitionAggregator`` is pure: the worker feeds it decoded spans with their offsets and the
wall-clock time, and asks it to ``advance``; it answers with the partial rollups of the windows
the watermark has passed and a progress mark. A span is late when the watermark had passed its
window's end before the span came; it is then counted in ``late_spans`` of the newest window,
never dropped. Whether a span is late depends on the watermark alone, never on what else waits,
so a replay judges every span as the first run did. A window closes (its partials go out) once
the watermark has passed its end and no span counted in it still waits for its parent's
attribution or for its trace's sampling decision. Windows close, and sampling decisions fall,
as each message is added (not when the timer runs), so a replay of the same messages takes
them at the same places; only the idle advance follows the clock.

A copy of a span already counted (same trace id and span id, while the trace is remembered)
counts only in ``duplicate_spans`` of the window it arrives in, as a late span would, and is
not sampled again. A copy that comes after its trace was forgotten is a new span to it.

Exactly-once effect without transactions: ``checkpoint(next_offset)`` names the offset it is
safe to commit (every trace that fed an open window, or is still remembered, was first seen
at or after it) and a small state to store with the commit: the watermark and closed-until
*as they were before that offset*, and how far windows have been sent. ``restore`` puts that
state back in a fresh aggregator; replaying from the committed offset then takes the same
decisions as the first run, re-sends byte-identical partials of the windows not yet committed,
and suppresses the windows that were already sent.

With a span budget a trace's sampling outcome also depends on the traces that charged its
budget slot; the outcome says where a replay must start to see them (``replay_from``) and the
window counting it holds its replay point there, as it does at the first offset of every trace
that fed it. The sampler says where decisions still to come, and decisions it remembers, hold
the replay point (``budget_replay_offset``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any, Protocol

import orjson

from processor.core.aggregate import WindowAggregate
from processor.core.attribution import AttributedSpan, TraceAssembler
from processor.core.lazy_heap import LazyHeap
from processor.core.rollup import ALL_SERIES, PartialRollup, PartitionProgress, SeriesKey
from processor.core.sampling import SampledSpan, TraceSampler
from processor.core.semconv import OVERFLOW_SERIES
from processor.core.spans import SpanRecord
from processor.core.windows import Watermark, window_start

_Series = tuple[str, tuple[str, ...]]  # (agent, dimensions): a SeriesKey's fields
_start_ns = attrgetter("start_ns")


class _Timed(Protocol):
    """What places a span in a window: a record, or its sampling outcome."""

    @property
    def end_ms(self) -> int: ...

    @property
    def late_window_ms(self) -> int | None: ...


@dataclass(slots=True)
class PartitionStats:
    spans: int = 0
    late_spans: int = 0
    overflow_spans: int = 0
    windows_closed: int = 0
    replayed_spans: int = 0  # spans of windows already sent before a restart: not resent
    duplicate_spans: int = 0  # copies of spans counted already: counted only as copies


@dataclass(slots=True, frozen=True)
class Checkpoint:
    """What a replay from ``offset`` needs to decide exactly as the first run did."""

    offset: int
    max_event_ms: int | None
    watermark_ms: int | None
    closed_until_ms: int | None
    sent_until_ms: int | None  # windows ending at or before this are out already
    # With the repartition by trace id: the last piece taken from each stage-0 source
    # partition, (partition, offset, piece), so a replay drops the same duplicates.
    sources: tuple[tuple[int, int, int], ...] = ()

    def encode(self) -> str:
        data: dict[str, Any] = {
            "v": 1,
            "max_event_ms": self.max_event_ms,
            "watermark_ms": self.watermark_ms,
            "closed_until_ms": self.closed_until_ms,
            "sent_until_ms": self.sent_until_ms,
        }
        if self.sources:
            data["sources"] = [list(mark) for mark in self.sources]
        return orjson.dumps(data).decode()

    @classmethod
    def decode(cls, offset: int, text: str) -> Checkpoint | None:
        """The checkpoint stored with a commit; None for an empty or foreign metadata string."""
        try:
            data: dict[str, Any] = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("v") != 1:
            return None
        return cls(
            offset=offset,
            max_event_ms=data.get("max_event_ms"),
            watermark_ms=data.get("watermark_ms"),
            closed_until_ms=data.get("closed_until_ms"),
            sent_until_ms=data.get("sent_until_ms"),
            sources=tuple((int(p), int(o), int(i)) for p, o, i in data.get("sources", ())),
        )


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
        trace_ttl_ms: int | None = None,
        sampler: TraceSampler | None = None,
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
        # window start -> (agent, dimensions) -> aggregate; plain tuples as keys, so the hot
        # path looks a series up without building a SeriesKey for every span
        self._windows: dict[int, dict[_Series, WindowAggregate]] = {}
        self._window_min_offset: dict[int, int] = {}
        self.closed_until_ms: int | None = None
        # Windows ending at or before this, the watermark has passed: their spans are late.
        # Closing them may wait longer, for spans in them still waiting.
        self._late_until_ms: int | None = None
        self._sent_until_ms: int | None = None  # after a restore: what the first run sent
        # trace id -> (offset where this partition first saw it, its latest end ms)
        self._trace_first_offset: dict[bytes, tuple[int, int]] = {}
        self._traces_by_end: LazyHeap[bytes, tuple[int, int]] = LazyHeap(
            self._trace_first_offset, itemgetter(1)
        )
        self._trace_ttl_ms = 2 * window_size_ms if trace_ttl_ms is None else trace_ttl_ms
        # The assembler must forget a trace no later than the partition forgets the trace's
        # first offset: a replay point that passes over a parent the assembler still knew
        # would attribute its children differently (as invocations) in the replay.
        self.assembler = assembler or TraceAssembler(
            attribution_wait_ms=allowed_lateness_ms, trace_ttl_ms=self._trace_ttl_ms
        )
        # (offset, max event, watermark, closed until) before each message not yet committed
        self._before: deque[tuple[int, int | None, int | None, int | None]] = deque()
        self._last_checkpoint: Checkpoint | None = None
        # Without a sampler every span is kept (and counted as sampled).
        self.sampler = sampler
        self._budgeted = sampler is not None and sampler.policy.budget_spans_per_second is not None
        if sampler is not None:
            # Decisions are forgotten with the traces (by event time, so a replay forgets them
            # where the first run did), not kept for as long as the cache has room.
            sampler.uses_decision_ttl(self._trace_ttl_ms)
        self._kept: list[SampledSpan] = []
        self._closed: list[PartialRollup] = []  # closed windows waiting for ``advance``
        # The smallest first offset of the windows in ``_closed``: until ``advance`` hands
        # them out, a commit must not pass it (a crash would lose those partials).
        self._closed_min_offset: int | None = None
        # ``closed_until_ms`` when ``advance`` last handed every closed window out: the
        # windows a checkpoint may call sent.
        self._handed_until_ms: int | None = None
        self.stats = PartitionStats()

    def restore(self, checkpoint: Checkpoint) -> None:
        """Start from a committed checkpoint (call before the first ``add``)."""
        self.watermark.max_event_ms = checkpoint.max_event_ms
        self.watermark.value_ms = checkpoint.watermark_ms
        self.closed_until_ms = checkpoint.closed_until_ms
        if checkpoint.watermark_ms is not None:  # as ``_settle`` left it for that watermark
            self._late_until_ms = window_start(checkpoint.watermark_ms, self._size)
        self._sent_until_ms = checkpoint.sent_until_ms
        self._last_checkpoint = checkpoint

    def add(self, offset: int, spans: Iterable[SpanRecord], now_ms: int) -> None:
        watermark = self.watermark
        self._before.append(
            (offset, watermark.max_event_ms, watermark.value_ms, self.closed_until_ms)
        )
        watermark.touch(now_ms)
        add_to_assembler = self.assembler.add
        aggregate = self._aggregate
        first_offsets = self._trace_first_offset
        by_end = self._traces_by_end
        attributed: list[AttributedSpan] = []  # reused: one list per message, not per span
        size = self._size
        late_until = self._late_until_ms  # moves in _settle only, after the loop
        # Parents start no later than their children: in start order, a span mostly finds
        # its parent attributed already instead of waiting for it (SDKs export children
        # first, as they end first). The sort is stable (ties keep the message's order), so a
        # replay of the message takes the same steps.
        for span in sorted(spans, key=_start_ns):
            end_ms = span.end_ms
            max_event = watermark.max_event_ms
            if max_event is None or end_ms > max_event:
                watermark.observe(end_ms, now_ms)
            if late_until is not None and end_ms - end_ms % size + size <= late_until:
                # Late on arrival. Its window is the head window now, not when it is
                # attributed or decided: those can come later in a replay (its parent, its
                # trace's decision may lie before the checkpoint), and the head moves on.
                span.late_window_ms = self._head_window(late_until)
            else:
                span.late_window_ms = None  # a record handed in again is judged again
            trace_id = span.trace_id
            seen = first_offsets.get(trace_id)
            if seen is None:
                first_offsets[trace_id] = (offset, end_ms)
                by_end.push(end_ms, trace_id)
            elif end_ms > seen[1]:
                first_offsets[trace_id] = (seen[0], end_ms)
                by_end.push(end_ms, trace_id)
            add_to_assembler(span, offset, attributed)
            if attributed:
                for item in attributed:
                    aggregate(item)
                attributed.clear()
        # Settle what is due at this message, not at the next timer tick: decisions then
        # fall at the same place in a replay.
        watermark_ms = watermark.value_ms
        if watermark_ms is not None:
            self._settle(watermark_ms)

    def _settle(self, watermark_ms: int) -> None:
        """Resolve what waited too long, take due sampling decisions, close passed windows."""
        for attributed in self.assembler.expire(watermark_ms):
            self._aggregate(attributed)
        if self.sampler is not None:
            self._count_decisions(self.sampler.advance(watermark_ms))
        candidate = window_start(watermark_ms, self._size)
        if self._late_until_ms is None or candidate > self._late_until_ms:
            self._late_until_ms = candidate
        # A window stays open while a span in it waits for its parent's attribution or for
        # its trace's sampling decision: it then reports its own sampled and dropped spans.
        # (Spans that come meanwhile are late all the same: what waits differs in a replay,
        # which does not know the traces seen before its checkpoint.)
        attribution_end = self.assembler.earliest_pending_end_ms()
        waiting_ends = [attribution_end]
        if self.sampler is not None:
            if self._budgeted:
                counted_from = self._counted_from_ms(attribution_end)
                if counted_from is not None:
                    self.sampler.forget_budget_before(counted_from)
            waiting_ends.append(self.sampler.earliest_buffered_end_ms())
        for waiting_end in waiting_ends:
            if waiting_end is not None:
                candidate = min(candidate, window_start(waiting_end, self._size))
        if self.closed_until_ms is not None and candidate <= self.closed_until_ms:
            return
        self.closed_until_ms = candidate
        for start in sorted(self._windows):
            if start + self._size > candidate:
                break
            window = self._windows.pop(start)
            first_offset = self._window_min_offset.pop(start)
            if self._already_sent(start):
                continue
            if self._closed_min_offset is None or first_offset < self._closed_min_offset:
                self._closed_min_offset = first_offset
            every = WindowAggregate()
            for series, aggregate in sorted(window.items(), key=lambda item: item[0]):
                self._closed.append(
                    PartialRollup(SeriesKey(*series), start, self._size, self.partition, aggregate)
                )
                every.merge(aggregate)
            # The series of every agent, merged here from the window's own aggregates: it
            # costs one merge per series and window, not a second count of every span, and
            # finalize treats it as one more agent (keyed, replayed and merged alike).
            self._closed.append(PartialRollup(ALL_SERIES, start, self._size, self.partition, every))
            self.stats.windows_closed += 1

    def _counted_from_ms(self, attribution_end_ms: int | None) -> int | None:
        """No span handed to the sampler from now on counts before this: a span to come is
        not late (its window is open) or counts in the open head window, and one waiting for
        its parent counts at its end or later. None before the first watermark."""
        late_until = self._late_until_ms
        if late_until is None:
            return None
        if attribution_end_ms is not None and attribution_end_ms < late_until:
            return attribution_end_ms
        return late_until

    def take_kept(self) -> list[SampledSpan]:
        """Spans kept (to go to Phoenix) since the last call; dropped ones are only counted."""
        kept, self._kept = self._kept, []
        return kept

    def _count_decisions(self, decided: list[SampledSpan]) -> None:
        size = self._size
        with_sampler = self.sampler is not None
        kept = self._kept
        for item in decided:
            if item.keep:
                kept.append(item)  # to Phoenix, even when its window is out already
            end_ms = item.end_ms
            own_start = end_ms - end_ms % size
            window = self._window_of_decision(item)
            if window is None:
                continue
            replay_from = item.offset
            if item.replay_from is not None and item.replay_from < replay_from:
                replay_from = item.replay_from  # a budget decision: see the module docstring
            aggregate = self._series(
                window, (item.agent, item.dimensions), replay_from, counts_span=False
            )
            if item.keep:
                aggregate.sampled_spans += 1
                if with_sampler and window == own_start:
                    # Exemplars are chosen among kept traces only: the link from MLflow to
                    # Phoenix never points at nothing, and nothing is kept just to be named.
                    aggregate.note_exemplar(
                        trace_id=item.trace_id,
                        duration_ns=item.duration_ns,
                        is_error=item.is_error,
                        is_invocation=item.is_invocation,
                    )
            else:
                aggregate.dropped_spans += 1

    def _window_of_decision(self, span: _Timed) -> int | None:
        """The window that counts the span's sampling outcome; None if already sent."""
        start = self._window_of(span)
        return None if self._already_sent(start) else start

    def _window_of(self, span: _Timed) -> int:
        """The span's own window; for a span late on arrival, the head window it found."""
        late = span.late_window_ms
        if late is not None:
            return late
        end_ms = span.end_ms
        start = end_ms - end_ms % self._size
        closed = self.closed_until_ms
        if closed is not None and start + self._size <= closed:
            # A safeguard: waiting for a parent or a decision holds a window open, so a span
            # not late on arrival finds its window open. Were it closed, count it as late.
            return self._head_window(closed)
        return start

    def _head_window(self, closed: int) -> int:
        """The window spans late now are counted in: the newest one open."""
        return window_start(max(self.watermark.max_event_ms or closed, closed), self._size)

    def _aggregate(self, item: AttributedSpan) -> None:
        if item.duplicate:
            self._count_duplicate(item)
            return
        span = item.span
        self.stats.spans += 1
        end_ms = span.end_ms
        start = end_ms - end_ms % self._size
        series = (item.agent, span.dimensions)
        seen = self._trace_first_offset.get(span.trace_id)
        # A window's replay point is the first offset of every trace that fed it.
        replay_from = seen[0] if seen is not None else item.offset
        window = self._window_of(span)
        counted_in: WindowAggregate | None = None  # None: its window is out already
        if window != start:  # late: on arrival, or (the safeguard there) since
            # Its window is out already: count it where it arrived, in the open window.
            self.stats.late_spans += 1
            if self._already_sent(window):
                self.stats.replayed_spans += 1
            else:
                counted_in = self._series(window, series, replay_from)
                counted_in.late_spans += 1
        elif self._already_sent(start):
            self.stats.replayed_spans += 1
        else:
            counted_in = self._series(start, series, replay_from)
            counted_in.add(
                trace_id=span.trace_id,
                duration_ns=span.end_ns - span.start_ns,
                is_error=span.is_error,
                is_invocation=item.is_invocation,
                is_llm=span.is_llm,
                tokens_prompt=span.tokens_prompt,
                tokens_completion=span.tokens_completion,
                tokens_total=span.tokens_total,
                cost_nanos=span.cost_nanos,
                tokens_cache_read=span.tokens_cache_read,
                tokens_cache_write=span.tokens_cache_write,
                tokens_reasoning=span.tokens_reasoning,
                cost_estimated_nanos=span.cost_estimated_nanos,
                unpriced=span.unpriced,
                extra_weight=span.extra_weight,
                # With a sampler, exemplars are named when a trace is kept (``_count_decisions``)
                exemplars=self.sampler is None,
            )
        # Sampling comes after the counts: aggregates see every span (rule 1).
        sampler = self.sampler
        if sampler is None:
            forwarded = SampledSpan.of(span, item.agent, item.offset, item.is_invocation)
            forwarded.keep = True
            self._count_decisions([forwarded])
        elif sampler.drop_now(span):
            # Dropped as it came: its outcome counts where the span did, the window that
            # ``_count_decisions`` would find for it.
            if counted_in is not None:
                counted_in.dropped_spans += 1
        else:
            decided = sampler.add(
                span,
                item.agent,
                item.offset,
                is_invocation=item.is_invocation,
                first_offset=replay_from,
            )
            if decided:
                self._count_decisions(decided)

    def _count_duplicate(self, item: AttributedSpan) -> None:
        """A copy counts in ``duplicate_spans`` only, of the window it arrived in: its own
        window while open, else the one late spans count in. Its original's agent names the
        series; it is not sampled again."""
        span = item.span
        self.stats.duplicate_spans += 1
        window = self._window_of(span)
        if self._already_sent(window):
            return
        seen = self._trace_first_offset.get(span.trace_id)
        # The window's replay must see the original again, to know the copy for one.
        replay_from = seen[0] if seen is not None else item.offset
        series = (item.agent, span.dimensions)
        self._series(window, series, replay_from, counts_span=False).duplicate_spans += 1

    def _already_sent(self, start: int) -> bool:
        sent = self._sent_until_ms
        return sent is not None and start + self._size <= sent

    def _series(
        self, start: int, series: _Series, offset: int, *, counts_span: bool = True
    ) -> WindowAggregate:
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
                if counts_span:
                    self.stats.overflow_spans += 1
                series = (OVERFLOW_SERIES, tuple(OVERFLOW_SERIES for _ in series[1]))
                aggregate = window.get(series)
            if aggregate is None:
                aggregate = window[series] = WindowAggregate()
        return aggregate

    def advance(self, now_ms: int, *, caught_up: bool) -> AdvanceResult:
        """Move the watermark (idle advance) and close every window it has passed."""
        watermark_ms = self.watermark.tick(now_ms, caught_up=caught_up)
        if watermark_ms is None:
            return AdvanceResult([], None)
        self._settle(watermark_ms)
        self._forget_old_traces(watermark_ms)
        partials, self._closed = self._closed, []
        self._closed_min_offset = None
        self._handed_until_ms = self.closed_until_ms
        closed = self.closed_until_ms
        progress = None if closed is None else PartitionProgress(self.partition, closed)
        return AdvanceResult(partials, progress)

    def _forget_old_traces(self, watermark_ms: int) -> None:
        limit = watermark_ms - self._trace_ttl_ms
        first_offsets = self._trace_first_offset
        # Not while the assembler or the sampler still holds the trace (one passed in may
        # have a longer TTL): a later child would find its parent there, a later span its
        # trace's decision, and a window counting that span must then hold the replay point
        # at the trace's first message, or the replay would take the span for a new trace.
        held_by_assembler = self.assembler.holds
        sampler = self.sampler
        held: list[bytes] = []
        by_end = self._traces_by_end
        for trace in by_end.pop_through(limit - 1):
            if held_by_assembler(trace) or (sampler is not None and sampler.holds(trace)):
                held.append(trace)  # asked again at the next advance
            else:
                del first_offsets[trace]
        for trace in held:
            by_end.push(first_offsets[trace][1], trace)

    def min_open_offset(self) -> int | None:
        """Smallest first offset of a trace that fed an open window, or a closed one not yet
        handed out by ``advance``, or that is still remembered."""
        offsets = list(self._window_min_offset.values())
        if self._closed_min_offset is not None:
            offsets.append(self._closed_min_offset)
        # A remembered trace may still get children that wait for a parent, and copies of its
        # spans: a replay must see its spans again to attribute the one and know the other.
        offsets.extend(first for first, _ in self._trace_first_offset.values())
        return min(offsets) if offsets else None

    def checkpoint(self, next_offset: int) -> Checkpoint:
        """The offset safe to commit (at most ``next_offset``, the offset after the last
        message added) and its state."""
        safe = next_offset
        holds = [self.min_open_offset()]
        sampler = self.sampler
        if sampler is not None:
            holds.append(sampler.pending_offset())
            if self._budgeted:
                counted_from = self._counted_from_ms(self.assembler.earliest_pending_end_ms())
                holds.append(sampler.budget_replay_offset(counted_from))
        for candidate in holds:
            if candidate is not None and candidate < safe:
                safe = candidate
        last = self._last_checkpoint
        if last is not None and safe <= last.offset:
            # Never move back: that offset may be committed already. (A trace first seen
            # before it that keeps sending spans is treated by a replay as a new trace.)
            return last
        before = self._before
        while before and before[0][0] < safe:
            before.popleft()
        if before:
            # the first message added at or after ``safe``: nothing in between changed state
            _, max_event, watermark_ms, closed = before[0]
        else:  # nothing added at or after ``safe`` yet: the state now is the state there
            max_event, watermark_ms, closed = (
                self.watermark.max_event_ms,
                self.watermark.value_ms,
                self.closed_until_ms,
            )
        # Sent means handed out by ``advance``: a window closed since (by a message added
        # while the caller was still sending) is not out yet, and its replay must resend it.
        sent = self._handed_until_ms
        if self._sent_until_ms is not None and (sent is None or self._sent_until_ms > sent):
            sent = self._sent_until_ms
        self._last_checkpoint = Checkpoint(safe, max_event, watermark_ms, closed, sent)
        return self._last_checkpoint

    @property
    def open_windows(self) -> list[int]:
        return sorted(self._windows)
