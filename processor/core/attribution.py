"""Agent attribution over a bounded buffer of traces.

A span's agent is its own agent attribute (``agent.name``, ``gen_ai.agent.name``; decided by
the decoder), else the nearest ancestor's agent attribute, else its own resource's
``service.name``, else ``unknown``. Only agent *attributes* flow down a trace: a span that
takes its agent from ``service.name`` does not hand its service's name to its children, so a
child span in another service falls back to that service's name. A span is an *invocation* of
its agent when its parent is absent or attributed to another agent: the top of a stretch of
the trace that the agent ran.

Children usually end, and so arrive, before their parents. A span whose parent has not been
seen yet waits in the buffer until the parent arrives (then the whole waiting subtree is
resolved top down), or until the watermark passes its end plus ``attribution_wait_ms``, or until
its trace is evicted to respect the bounds. In the last two cases the topmost waiting ancestor
of the span is resolved as if it had no parent and its waiting subtree with it, so a span is
never cut off from a parent that is in the buffer. Every span that is added comes out exactly
once; every early resolution is counted.

A span whose (trace id, span id) the buffer holds already, resolved or waiting, is a copy: a
producer delivered it twice. It comes out marked ``duplicate``, with its original's agent:
at once when the original is resolved, else together with the original. So a copy is
recognised for as long as its trace is remembered (the TTL after the trace's last end, or
until evicted), with no memory beyond what attribution keeps anyway.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from processor.core.lazy_heap import LazyHeap
from processor.core.semconv import UNKNOWN_AGENT
from processor.core.spans import SpanRecord


@dataclass(slots=True)  # not frozen: a frozen init is slower, and one is made per span
class AttributedSpan:
    span: SpanRecord
    agent: str
    is_invocation: bool
    offset: int
    duplicate: bool = False  # a copy of a span that came out already: not to be counted again


# (attributed agent, agent attribute that flows to the children or None)
_Resolved = tuple[str, str | None]

# Distinct (agent, lineage) pairs shared by the resolved spans; past this many (bad input
# with ever new agent names) the table starts over, which costs memory, never correctness.
_MAX_SHARED_PAIRS = 4_096


@dataclass(slots=True)
class _Trace:
    resolved: dict[bytes, _Resolved] = field(default_factory=dict)  # span id -> its agent
    # Spans waiting for their parent, by a sequence number unique in the assembler; a dict
    # per key is an ordered set with O(1) removal.
    waiting: dict[int, tuple[SpanRecord, int]] = field(default_factory=dict)
    by_parent: dict[bytes, dict[int, None]] = field(default_factory=dict)
    by_span: dict[bytes, dict[int, None]] = field(default_factory=dict)
    # copies of waiting spans, by span id: they come out with their original
    copies: dict[bytes, list[tuple[SpanRecord, int]]] | None = None
    last_end_ms: int = 0


_LAST_END: Callable[[_Trace], int] = attrgetter("last_end_ms")  # what the TTL goes by


@dataclass(slots=True)
class AssemblerStats:
    traces: int = 0
    pending_spans: int = 0
    resolved_without_parent: int = 0  # the parent did not come within the wait, or was evicted
    evicted_traces: int = 0  # pushed out early by the trace or span limit


class TraceAssembler:
    """Attributes spans to agents, holding a span back only while its parent may still come.

    ``max_traces`` and ``max_spans`` bound the buffer (spans held = waiting spans plus the
    resolved spans remembered so that later children can find their parent); past either, the
    least recently touched trace is evicted.
    """

    def __init__(
        self,
        *,
        max_traces: int = 10_000,
        attribution_wait_ms: int = 5_000,
        trace_ttl_ms: int = 120_000,
        max_spans: int = 1_000_000,
    ) -> None:
        if max_traces < 1:
            raise ValueError("max_traces must be at least 1")
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1")
        if attribution_wait_ms < 0 or trace_ttl_ms < 0:
            raise ValueError("attribution_wait_ms and trace_ttl_ms must not be negative")
        self._max_traces = max_traces
        self._max_spans = max_spans
        self._wait_ms = attribution_wait_ms
        self._ttl_ms = trace_ttl_ms
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        # (end ms, sequence, trace id) of every waiting span; stale entries are skipped
        self._pending_heap: list[tuple[int, int, bytes]] = []
        # (last end ms, trace id) per trace; stale entries are skipped. The TTL goes by event
        # time alone, not by arrival order: a replay from a checkpoint sees fewer traces, and
        # must forget a trace when the first run did.
        self._ttl_heap: LazyHeap[bytes, _Trace] = LazyHeap(self._traces, _LAST_END)
        self._sequence = 0
        self._spans_held = 0
        # One tuple per distinct pair, shared by every span resolved to it: a trace's
        # resolved spans are remembered for the TTL, and a tuple per span was ~56 bytes of
        # each (its agent string too, when the span carried its own agent attribute).
        self._pairs: dict[_Resolved, _Resolved] = {}
        self.stats = AssemblerStats()

    def add(
        self, span: SpanRecord, offset: int, out: list[AttributedSpan] | None = None
    ) -> list[AttributedSpan]:
        """Take one span; return every span whose attribution is now known (appended to
        ``out`` when given: the caller can reuse one list for many spans)."""
        if out is None:
            out = []
        traces = self._traces
        trace_id = span.trace_id
        trace = traces.get(trace_id)
        if trace is None:
            while len(traces) >= self._max_traces:
                self._evict_oldest(out)
        else:
            traces.move_to_end(trace_id)
        while self._spans_held >= self._max_spans and traces:
            self._evict_oldest(out)  # the span's own trace goes last: it was touched last
        trace = traces.get(trace_id)
        if trace is None:
            trace = traces[trace_id] = _Trace()
            self.stats.traces = len(traces)
        self._add_to(trace, span, offset, out)
        return out

    def _add_to(
        self, trace: _Trace, span: SpanRecord, offset: int, out: list[AttributedSpan]
    ) -> None:
        span_id = span.span_id
        original = trace.resolved.get(span_id)
        if original is not None:
            out.append(AttributedSpan(span, original[0], False, offset, True))
            return
        if span_id in trace.by_span:
            if trace.copies is None:
                trace.copies = {}
            trace.copies.setdefault(span_id, []).append((span, offset))
            self._spans_held += 1
            return
        end_ms = span.end_ms
        if end_ms > trace.last_end_ms:
            trace.last_end_ms = end_ms
            self._ttl_heap.push(end_ms, span.trace_id)
        parent = span.parent_span_id
        if not parent:
            self._resolve(trace, span, offset, None, out)
            return
        parent_resolved = trace.resolved.get(parent)
        if parent_resolved is not None:
            self._resolve(trace, span, offset, parent_resolved, out)
            return
        self._sequence += 1
        sequence = self._sequence
        trace.waiting[sequence] = (span, offset)
        trace.by_parent.setdefault(parent, {})[sequence] = None
        trace.by_span.setdefault(span_id, {})[sequence] = None
        self._spans_held += 1
        self.stats.pending_spans += 1
        heapq.heappush(self._pending_heap, (end_ms, sequence, span.trace_id))

    def _take(self, trace: _Trace, sequence: int) -> tuple[SpanRecord, int]:
        """Remove one waiting span from the buffer's indexes."""
        span, offset = trace.waiting.pop(sequence)
        siblings = trace.by_parent.get(span.parent_span_id)
        if siblings is not None:
            del siblings[sequence]
            if not siblings:
                del trace.by_parent[span.parent_span_id]
        same_id = trace.by_span[span.span_id]
        del same_id[sequence]
        if not same_id:
            del trace.by_span[span.span_id]
        self._spans_held -= 1
        self.stats.pending_spans -= 1
        return span, offset

    def _resolve(
        self,
        trace: _Trace,
        span: SpanRecord,
        offset: int,
        parent: _Resolved | None,
        out: list[AttributedSpan],
    ) -> None:
        # Iterative, not recursive: a deep chain of waiting descendants must not blow the stack.
        # The stack is only built when children wait: most spans find their parent resolved.
        resolved_spans = trace.resolved
        by_parent = trace.by_parent
        pairs = self._pairs
        stack: list[tuple[SpanRecord, int, _Resolved]] = []
        current, current_offset, current_parent = span, offset, parent
        while True:
            if current_parent is None:
                parent_agent = inherited = None
            else:
                parent_agent, inherited = current_parent
            lineage = current.own_agent or inherited
            agent = lineage or current.origin.service_name or UNKNOWN_AGENT
            pair = (agent, lineage)
            resolved = pairs.get(pair)
            if resolved is None:
                if len(pairs) >= _MAX_SHARED_PAIRS:
                    pairs.clear()
                resolved = pairs[pair] = pair
            agent = resolved[0]
            span_id = current.span_id
            if span_id not in resolved_spans:
                self._spans_held += 1
            resolved_spans[span_id] = resolved
            out.append(AttributedSpan(current, agent, parent_agent != agent, current_offset))
            if trace.copies:
                self._release_copies(trace.copies, span_id, agent, out)
            children = by_parent.pop(span_id, None) if by_parent else None
            if children:
                for sequence in children:
                    child, child_offset = self._take(trace, sequence)
                    stack.append((child, child_offset, resolved))
            if not stack:
                return
            current, current_offset, current_parent = stack.pop()

    def _release_copies(
        self,
        copies: dict[bytes, list[tuple[SpanRecord, int]]],
        span_id: bytes,
        agent: str,
        out: list[AttributedSpan],
    ) -> None:
        """Hand out the copies of a span that waited, now that its agent is known."""
        waiting = copies.pop(span_id, None)
        if waiting:
            self._spans_held -= len(waiting)
            out.extend(AttributedSpan(copy, agent, False, offset, True) for copy, offset in waiting)

    def _resolve_as_orphan(self, trace: _Trace, sequence: int, out: list[AttributedSpan]) -> None:
        """Give up waiting for the topmost waiting ancestor of a span; resolve its subtree."""
        top = sequence
        seen = {sequence}
        while True:
            parent_id = trace.waiting[top][0].parent_span_id
            ancestors = trace.by_span.get(parent_id)
            if not ancestors:
                break
            above = next(iter(ancestors))
            if above in seen:
                break  # a cycle of parent ids (bad input): cut it here
            seen.add(above)
            top = above
        span, offset = self._take(trace, top)
        self.stats.resolved_without_parent += 1
        self._resolve(trace, span, offset, None, out)

    def expire(self, watermark_ms: int) -> list[AttributedSpan]:
        """Resolve spans that waited too long for a parent; forget traces past their TTL."""
        out: list[AttributedSpan] = []
        heap = self._pending_heap
        limit = watermark_ms - self._wait_ms
        while heap and heap[0][0] <= limit:
            _, sequence, trace_id = heapq.heappop(heap)
            trace = self._traces.get(trace_id)
            if trace is not None and sequence in trace.waiting:
                self._resolve_as_orphan(trace, sequence, out)
        for trace_id in self._ttl_heap.pop_through(watermark_ms - self._ttl_ms):
            self._drop(trace_id, out)
        return out

    def _evict_oldest(self, out: list[AttributedSpan]) -> None:
        trace_id = next(iter(self._traces))
        self.stats.evicted_traces += 1
        self._drop(trace_id, out)

    def _drop(self, trace_id: bytes, out: list[AttributedSpan]) -> None:
        trace = self._traces.pop(trace_id)
        # Whatever still waits is decided now, as if its parent were absent, and counted.
        while trace.waiting:
            self._resolve_as_orphan(trace, next(iter(trace.waiting)), out)
        self._spans_held -= len(trace.resolved)
        self.stats.traces = len(self._traces)

    def holds(self, trace_id: bytes) -> bool:
        """Whether the trace is still remembered (its spans can be parents)."""
        return trace_id in self._traces

    def earliest_pending_end_ms(self) -> int | None:
        """End time of the oldest span still waiting for its parent, if any."""
        heap = self._pending_heap
        while heap:
            _, sequence, trace_id = heap[0]
            trace = self._traces.get(trace_id)
            if trace is not None and sequence in trace.waiting:
                return heap[0][0]
            heapq.heappop(heap)  # resolved meanwhile: drop the stale entry
        return None

    def min_pending_offset(self) -> int | None:
        """The smallest source offset of a span still waiting, for safe offset commits."""
        offsets = [
            offset for trace in self._traces.values() for _, offset in trace.waiting.values()
        ]
        return min(offsets) if offsets else None

    @property
    def trace_count(self) -> int:
        return len(self._traces)

    @property
    def spans_held(self) -> int:
        """Spans in the buffer: waiting ones and resolved ones kept for their children."""
        return self._spans_held
