"""Agent attribution over a bounded buffer of traces.

A span's agent is its own agent attribute, else its nearest ancestor's, else the resource's
``service.name``, else ``unknown``. A span is an *invocation* of its agent when its parent is
absent or belongs to another agent: the top of a stretch of the trace that the agent ran.

Children usually end, and so arrive, before their parents. A span whose parent has not been
seen yet waits in the buffer until the parent arrives, or until the watermark passes its end
plus ``attribution_wait_ms`` (then it is resolved as if it had no parent), or until its trace
is evicted to respect the bounds. Every early resolution is counted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from processor.core.semconv import UNKNOWN_AGENT
from processor.core.spans import SpanRecord


@dataclass(slots=True, frozen=True)
class AttributedSpan:
    span: SpanRecord
    agent: str
    is_invocation: bool
    offset: int


@dataclass(slots=True)
class _Trace:
    agents: dict[bytes, str] = field(default_factory=dict)  # span id -> agent, resolved spans
    pending: dict[bytes, list[tuple[SpanRecord, int]]] = field(default_factory=dict)
    last_end_ms: int = 0


@dataclass(slots=True)
class AssemblerStats:
    traces: int = 0
    pending_spans: int = 0
    resolved_without_parent: int = 0  # parent never came within the wait
    evicted_traces: int = 0  # pushed out early by the trace limit


class TraceAssembler:
    def __init__(
        self,
        *,
        max_traces: int = 10_000,
        attribution_wait_ms: int = 5_000,
        trace_ttl_ms: int = 120_000,
    ) -> None:
        if max_traces < 1:
            raise ValueError("max_traces must be at least 1")
        if attribution_wait_ms < 0 or trace_ttl_ms < 0:
            raise ValueError("attribution_wait_ms and trace_ttl_ms must not be negative")
        self._max_traces = max_traces
        self._wait_ms = attribution_wait_ms
        self._ttl_ms = trace_ttl_ms
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        # (end ms, sequence, trace id, parent id, span id): pending spans by end time
        self._pending_heap: list[tuple[int, int, bytes, bytes, bytes]] = []
        self._sequence = 0
        self.stats = AssemblerStats()

    def add(self, span: SpanRecord, offset: int) -> list[AttributedSpan]:
        """Take one span; return every span whose attribution is now known."""
        traces = self._traces
        trace = traces.get(span.trace_id)
        if trace is None:
            trace = traces[span.trace_id] = _Trace()
            if len(traces) > self._max_traces:
                out: list[AttributedSpan] = []
                self._evict_oldest(out)
                resolved = self._add_to(trace, span, offset)
                return out + resolved
        else:
            traces.move_to_end(span.trace_id)
        return self._add_to(trace, span, offset)

    def _add_to(self, trace: _Trace, span: SpanRecord, offset: int) -> list[AttributedSpan]:
        if span.end_ms > trace.last_end_ms:
            trace.last_end_ms = span.end_ms
        parent = span.parent_span_id
        out: list[AttributedSpan] = []
        if not parent:
            self._resolve(trace, span, offset, None, out)
            return out
        parent_agent = trace.agents.get(parent)
        if parent_agent is not None:
            self._resolve(trace, span, offset, parent_agent, out)
            return out
        trace.pending.setdefault(parent, []).append((span, offset))
        self.stats.pending_spans += 1
        self._sequence += 1
        heapq.heappush(
            self._pending_heap,
            (span.end_ms, self._sequence, span.trace_id, parent, span.span_id),
        )
        return out

    def _resolve(
        self,
        trace: _Trace,
        span: SpanRecord,
        offset: int,
        parent_agent: str | None,
        out: list[AttributedSpan],
    ) -> None:
        # Iterative, not recursive: a deep chain of waiting descendants must not blow the stack.
        stack = [(span, offset, parent_agent)]
        while stack:
            current, current_offset, inherited = stack.pop()
            agent = current.own_agent or inherited or current.service_name or UNKNOWN_AGENT
            trace.agents[current.span_id] = agent
            out.append(
                AttributedSpan(
                    current, agent, inherited is None or inherited != agent, current_offset
                )
            )
            waiting = trace.pending.pop(current.span_id, None)
            if waiting:
                self.stats.pending_spans -= len(waiting)
                stack.extend((child, child_offset, agent) for child, child_offset in waiting)

    def expire(self, watermark_ms: int) -> list[AttributedSpan]:
        """Resolve spans that waited too long for a parent; forget traces past their TTL."""
        out: list[AttributedSpan] = []
        heap = self._pending_heap
        limit = watermark_ms - self._wait_ms
        while heap and heap[0][0] <= limit:
            _, _, trace_id, parent, span_id = heapq.heappop(heap)
            trace = self._traces.get(trace_id)
            if trace is not None:
                self._resolve_orphan(trace, parent, span_id, out)
        ttl_limit = watermark_ms - self._ttl_ms
        traces = self._traces
        while traces:
            trace_id, trace = next(iter(traces.items()))
            if trace.last_end_ms > ttl_limit:
                break
            self._drop(trace_id, out)
        return out

    def _resolve_orphan(
        self, trace: _Trace, parent: bytes, span_id: bytes, out: list[AttributedSpan]
    ) -> None:
        waiting = trace.pending.get(parent)
        if not waiting:
            return  # already resolved when its parent arrived
        for index, (span, offset) in enumerate(waiting):
            if span.span_id == span_id:
                del waiting[index]
                if not waiting:
                    del trace.pending[parent]
                self.stats.pending_spans -= 1
                self.stats.resolved_without_parent += 1
                self._resolve(trace, span, offset, None, out)
                return

    def _evict_oldest(self, out: list[AttributedSpan]) -> None:
        trace_id = next(iter(self._traces))
        self.stats.evicted_traces += 1
        self._drop(trace_id, out)

    def _drop(self, trace_id: bytes, out: list[AttributedSpan]) -> None:
        trace = self._traces.pop(trace_id)
        # Whatever still waits is decided now, as if its parent were absent, and counted.
        for waiting in list(trace.pending.values()):
            for span, offset in waiting:
                if span.span_id in trace.agents:
                    continue
                self.stats.pending_spans -= 1
                self.stats.resolved_without_parent += 1
                self._resolve(trace, span, offset, None, out)
        trace.pending.clear()

    def earliest_pending_end_ms(self) -> int | None:
        """End time of the oldest span still waiting for its parent, if any."""
        heap = self._pending_heap
        while heap:
            _, _, trace_id, parent, span_id = heap[0]
            trace = self._traces.get(trace_id)
            waiting = trace.pending.get(parent) if trace is not None else None
            if waiting and any(span.span_id == span_id for span, _ in waiting):
                return heap[0][0]
            heapq.heappop(heap)  # resolved meanwhile: drop the stale entry
        return None

    def min_pending_offset(self) -> int | None:
        """The smallest source offset of a span still waiting, for safe offset commits."""
        offsets = [
            offset
            for trace in self._traces.values()
            for waiting in trace.pending.values()
            for _, offset in waiting
        ]
        return min(offsets) if offsets else None

    @property
    def trace_count(self) -> int:
        return len(self._traces)
