"""Tail sampling of assembled traces, in event time: what goes to Phoenix, and why.

``TraceSampler`` buffers the spans of each trace until the trace is due, decides the whole
trace at once and remembers the decision, so that every span of a trace gets the same answer:

- **Due**: the watermark handed to ``advance`` has reached the root span's end plus the grace,
  or the first-seen span's end plus the maximum wait. Due traces are decided oldest due first.
- **Kept** when any keep policy holds; the reason is the first that applies, in the order
  ``error``, ``latency`` (max end - min start over the spans buffered), ``attribute``,
  ``exemplar`` (``force_keep``), ``probabilistic`` (the trace's randomness is at or above the
  policy's threshold: the same answer on any worker, OpenTelemetry-consistent).
- **Capped** by the per-agent rate limit, span by span in arrival order; exemplar traces are
  exempt, so a rollup's link never points at nothing.
- **Late spans** of a decided trace follow the cached decision at once. The cache is an LRU
  bounded in size and, given a decision TTL, forgets a trace in event time: once the watermark
  is that far past the trace's last end, as the assembler forgets a trace. A replay from a
  checkpoint then forgets it where the first run did.
- **Bounded**: past ``max_buffered_traces`` or ``max_buffered_spans`` the oldest trace (first
  seen) is decided at once on the spans it has, and counted in ``decided_early``.
- **Nothing to wait for**: when only the probability can keep a trace
  (``SamplingPolicy.probability_only``), a trace is decided on its first span (its randomness
  cannot rise with more spans), unless ``force_keep`` named it first; its other spans follow
  the cached decision. Nothing is buffered, so a busy worker holds no spans for sampling and
  its windows need not wait for decisions. Counted in ``decided_at_once``.

Every span added comes out exactly once, as a ``SampledSpan``; ``drop_now`` lets a caller ask
first whether a span is dropped as it comes (then it is not added, and no object is made for
it). There is no wall clock and no randomness besides the trace ids': the same calls give the
same outputs.

Kept spans carry the threshold to write into their tracestate (``mark_forwarded``): ours for a
probabilistic keep, 0 (adjusted count 1 from this stage) for a rule's keep, raised to the
upstream ``th`` when there is one. An upstream ``th`` that the span's own randomness
contradicts is erased (threshold None: unknown adjusted count), as the specification asks.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

from processor.core.lazy_heap import LazyHeap
from processor.core.sampling.policy import (
    DROP_NOT_SAMPLED,
    DROP_RATE_LIMITED,
    KEEP_REASONS,
    REASON_ATTRIBUTE,
    REASON_ERROR,
    REASON_EXEMPLAR,
    REASON_LATENCY,
    REASON_PROBABILISTIC,
    SamplingPolicy,
    matches_attributes,
)
from processor.core.sampling.rate_limit import AgentRateLimiter
from processor.core.sampling.sampled_span import SampledSpan
from processor.core.sampling.threshold import ALWAYS_SAMPLE_THRESHOLD, trace_id_randomness
from processor.core.sampling.tracestate import parse_tracestate
from processor.core.spans import NANOS_PER_MILLI, SpanRecord

_NO_RANDOMNESS_YET = 1 << 57  # above any 56-bit randomness: the first span's replaces it


@dataclass(slots=True)
class SamplingStats:
    spans_kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEEP_REASONS, 0))
    spans_dropped: int = 0  # every span not forwarded, rate-limited ones included
    spans_rate_limited: int = 0  # of spans_dropped: kept traces' spans over the rate limit
    spans_after_decision: int = 0  # late spans that followed their trace's cached decision
    upstream_th_erased: int = 0  # kept spans whose upstream th contradicted their randomness
    traces_decided: int = 0
    traces_kept: int = 0
    decided_early: int = 0  # pushed out by the buffer bounds, decided on what was there
    decided_at_once: int = 0  # on their first span: only the probability could keep them
    cache_evictions: int = 0
    decisions_expired: int = 0  # forgotten past the decision TTL (event time)
    buffered_spans: int = 0
    buffered_traces: int = 0

    @property
    def spans_kept_total(self) -> int:
        return sum(self.spans_kept.values())


@dataclass(frozen=True, slots=True)
class _Decision:
    keep: bool
    reason: str | None
    threshold: int  # this stage's threshold: ours if probabilistic, else always-sample
    exempt: bool  # an exemplar trace: not rate limited
    at_once: bool = False  # taken on the trace's first span: its later spans are not late


@dataclass(slots=True)
class _Trace:
    """An undecided trace: its spans in arrival order and what the policies need of them."""

    spans: list[SampledSpan]  # undecided, in arrival order
    due_ms: int
    due_sequence: int  # identifies the live heap entry; older entries are stale
    min_offset: int
    min_start_ns: int
    min_end_ns: int
    max_end_ns: int
    randomness: int
    has_error: bool = False
    attribute_match: bool = False
    forced: bool = False
    id_randomness_seen: bool = False  # a span without a tracestate has been folded in


# What the lazy heaps order buffered traces by.
_MIN_END: Callable[[_Trace], int] = attrgetter("min_end_ns")
_MIN_OFFSET: Callable[[_Trace], int] = attrgetter("min_offset")


class TraceSampler:
    """Decides, per trace, which spans go to Phoenix. See the module docstring."""

    def __init__(self, policy: SamplingPolicy, *, decision_ttl_ms: int | None = None) -> None:
        if not isinstance(policy, SamplingPolicy):
            raise ValueError(f"policy must be a SamplingPolicy, got {policy!r}")
        if decision_ttl_ms is not None and decision_ttl_ms < 0:
            raise ValueError("decision_ttl_ms must not be negative")
        self.policy = policy
        rate = policy.agent_spans_per_second
        self._limiter = AgentRateLimiter(rate) if rate is not None else None
        self._at_once = policy.probability_only
        self._traces: dict[bytes, _Trace] = {}  # insertion order = first seen
        self._due: list[tuple[int, int, bytes]] = []  # (due ms, sequence, trace id)
        # The earliest buffered end and the smallest buffered offset: asked after every
        # message, so a scan of every buffered trace would not do.
        self._by_end = LazyHeap(self._traces, _MIN_END)
        self._by_offset = LazyHeap(self._traces, _MIN_OFFSET)
        self._sequence = 0
        self._decisions: OrderedDict[bytes, _Decision] = OrderedDict()
        # With a TTL: trace id -> the last end (ms) of a decided trace, the TTL counts from it
        self._decision_ttl_ms = decision_ttl_ms
        self._decided_end: dict[bytes, int] = {}
        self._decided_by_end = LazyHeap(self._decided_end, lambda end: end)
        self._forced_unseen: OrderedDict[bytes, None] = OrderedDict()
        self._clock_ms = 0  # the largest watermark seen: the rate limiter's event time
        self.stats = SamplingStats()

    # --- input -----------------------------------------------------------------------------

    def add(
        self, span: SpanRecord, agent: str, offset: int, *, is_invocation: bool = False
    ) -> list[SampledSpan]:
        """Take one attributed span; return the spans decided now: none while its trace is
        undecided, the span itself when its trace was decided before, and the spans of any
        trace the bounds forced out. What is kept of the span is its ``SampledSpan``."""
        out: list[SampledSpan] = []
        trace_id = span.trace_id
        item = SampledSpan.of(span, agent, offset, is_invocation)
        decision = self._decisions.get(trace_id)
        if decision is not None:
            self._decisions.move_to_end(trace_id)
            self._extend_decided(trace_id, span.end_ms)
            if not decision.at_once:
                self.stats.spans_after_decision += 1
            self._emit(item, decision, out)
            return out
        traces = self._traces
        if self._at_once and trace_id not in traces and trace_id not in self._forced_unseen:
            keep = _randomness(span) >= self.policy.threshold
            self._emit(item, self._decide_at_once(trace_id, keep, span.end_ms), out)
            return out
        policy = self.policy
        if trace_id not in traces:
            while len(traces) >= policy.max_buffered_traces:
                self._decide(next(iter(traces)), out, early=True)
        while self.stats.buffered_spans >= policy.max_buffered_spans and traces:
            self._decide(next(iter(traces)), out, early=True)  # maybe the span's own trace
        trace = traces.get(trace_id)
        if trace is None:
            decision = self._decisions.get(trace_id)
            if decision is not None:  # its own trace was just decided early
                self._extend_decided(trace_id, span.end_ms)
                self.stats.spans_after_decision += 1
                self._emit(item, decision, out)
                return out
            trace = self._start(span, offset)
        self._buffer(trace, span, item)
        return out

    def drop_now(self, span: SpanRecord) -> bool:
        """Whether ``span`` is dropped right now, its trace decided before or on this span: then
        the sampler has counted it and is done with it, and the caller counts it as dropped
        without a ``SampledSpan``. False: hand the span to ``add``.

        With only a probability most spans are dropped as they come; skipping ``add`` for them
        skips an object per span (measured in-process at p=0.1: ~15% more spans per CPU-second).
        """
        trace_id = span.trace_id
        decision = self._decisions.get(trace_id)
        if decision is None:
            if (
                not self._at_once
                or trace_id in self._traces
                or trace_id in self._forced_unseen
                or _randomness(span) >= self.policy.threshold
            ):
                return False  # buffered, or kept: ``add`` says which
            self._decide_at_once(trace_id, False, span.end_ms)
        elif decision.keep:
            return False
        else:
            self._decisions.move_to_end(trace_id)
            self._extend_decided(trace_id, span.end_ms)
            if not decision.at_once:
                self.stats.spans_after_decision += 1
        self.stats.spans_dropped += 1
        return True

    def _start(self, span: SpanRecord, offset: int) -> _Trace:
        self._sequence += 1
        trace = _Trace(
            spans=[],
            due_ms=span.end_ms + self.policy.decision_max_wait_ms,
            due_sequence=self._sequence,
            min_offset=offset,
            min_start_ns=span.start_ns,
            min_end_ns=span.end_ns,
            max_end_ns=span.end_ns,
            randomness=_NO_RANDOMNESS_YET,
        )
        if span.trace_id in self._forced_unseen:  # force_keep came before its first span
            del self._forced_unseen[span.trace_id]
            trace.forced = True
        self._traces[span.trace_id] = trace
        heapq.heappush(self._due, (trace.due_ms, trace.due_sequence, span.trace_id))
        self._by_end.push(span.end_ns, span.trace_id)
        self._by_offset.push(offset, span.trace_id)
        self.stats.buffered_traces = len(self._traces)
        return trace

    def _buffer(self, trace: _Trace, span: SpanRecord, item: SampledSpan) -> None:
        """Fold the span into what the policies need of its trace; keep only ``item``."""
        trace.spans.append(item)
        offset = item.offset
        self.stats.buffered_spans += 1
        if offset < trace.min_offset:
            trace.min_offset = offset
            self._by_offset.push(offset, span.trace_id)
        if span.start_ns < trace.min_start_ns:
            trace.min_start_ns = span.start_ns
        if span.end_ns > trace.max_end_ns:
            trace.max_end_ns = span.end_ns
        elif span.end_ns < trace.min_end_ns:
            trace.min_end_ns = span.end_ns
            self._by_end.push(span.end_ns, span.trace_id)
        # The trace's randomness is the smallest of its spans' (spans disagreeing is bad
        # input; the minimum does not depend on their order). A span without a tracestate
        # has its trace id's, the same for all of them: read once per trace.
        if span.tracestate or not trace.id_randomness_seen:
            randomness = _randomness(span)
            if randomness < trace.randomness:
                trace.randomness = randomness
            if not span.tracestate:
                trace.id_randomness_seen = True
        if span.is_error:
            trace.has_error = True
        matches = self.policy.attribute_matches
        if matches and not trace.attribute_match:
            trace.attribute_match = matches_attributes(span.pb.attributes, matches)
        if not span.parent_span_id:
            root_due = span.end_ms + self.policy.decision_grace_ms
            if root_due < trace.due_ms:
                self._sequence += 1
                trace.due_ms, trace.due_sequence = root_due, self._sequence
                heapq.heappush(self._due, (root_due, self._sequence, span.trace_id))

    # --- time ------------------------------------------------------------------------------

    def advance(self, watermark_ms: int) -> list[SampledSpan]:
        """Decide every trace due at ``watermark_ms`` (event time), the earliest due first."""
        if watermark_ms > self._clock_ms:
            self._clock_ms = watermark_ms
        out: list[SampledSpan] = []
        heap = self._due
        traces = self._traces
        while heap and heap[0][0] <= self._clock_ms:
            _, sequence, trace_id = heapq.heappop(heap)
            trace = traces.get(trace_id)
            if trace is not None and trace.due_sequence == sequence:
                self._decide(trace_id, out, early=False)
        if len(heap) > 2 * len(traces) + 1_024:  # stale entries of early or re-due traces
            self._due = [(t.due_ms, t.due_sequence, tid) for tid, t in traces.items()]
            heapq.heapify(self._due)
        ttl = self._decision_ttl_ms
        if ttl is not None:
            decisions, decided_end = self._decisions, self._decided_end
            for trace_id in self._decided_by_end.pop_through(self._clock_ms - ttl):
                del decisions[trace_id], decided_end[trace_id]
                self.stats.decisions_expired += 1
        return out

    def uses_decision_ttl(self, ttl_ms: int) -> None:
        """Forget a decision once the watermark is ``ttl_ms`` past its trace's last end,
        unless a TTL is set already. Call it before the first span."""
        if ttl_ms < 0:
            raise ValueError("decision_ttl_ms must not be negative")
        if self._decisions:
            raise RuntimeError("uses_decision_ttl must come before the first decision")
        if self._decision_ttl_ms is None:
            self._decision_ttl_ms = ttl_ms

    # --- exemplars -------------------------------------------------------------------------

    def force_keep(self, trace_id: bytes) -> None:
        """Keep this trace, with reason ``exemplar`` unless a rule's reason comes first, and
        exempt it from the rate limit. For a trace decided and dropped already, only the spans
        that come later are kept; for a trace not seen yet, its spans when they come."""
        trace = self._traces.get(trace_id)
        if trace is not None:
            trace.forced = True
            return
        decision = self._decisions.get(trace_id)
        if decision is not None:
            at_once = decision.at_once
            if not decision.keep:
                decision = _Decision(
                    True, REASON_EXEMPLAR, ALWAYS_SAMPLE_THRESHOLD, True, at_once=at_once
                )
            elif not decision.exempt:
                decision = _Decision(
                    True, decision.reason, decision.threshold, True, at_once=at_once
                )
            self._decisions[trace_id] = decision
            self._decisions.move_to_end(trace_id)
            return
        forced = self._forced_unseen
        forced[trace_id] = None
        forced.move_to_end(trace_id)
        while len(forced) > self.policy.max_buffered_traces:
            forced.popitem(last=False)

    # --- deciding --------------------------------------------------------------------------

    def _reason(self, trace: _Trace) -> str | None:
        policy = self.policy
        if policy.keep_errors and trace.has_error:
            return REASON_ERROR
        latency_ms = policy.latency_threshold_ms
        if (
            latency_ms is not None
            and trace.max_end_ns - trace.min_start_ns >= latency_ms * NANOS_PER_MILLI
        ):
            return REASON_LATENCY
        if trace.attribute_match:
            return REASON_ATTRIBUTE
        if trace.forced:
            return REASON_EXEMPLAR
        if trace.randomness >= policy.threshold:
            return REASON_PROBABILISTIC
        return None

    def _decide_at_once(self, trace_id: bytes, keep: bool, end_ms: int) -> _Decision:
        stats = self.stats
        stats.traces_decided += 1
        stats.decided_at_once += 1
        if keep:
            stats.traces_kept += 1
        reason = REASON_PROBABILISTIC if keep else None
        decision = _Decision(keep, reason, self.policy.threshold, False, at_once=True)
        self._remember(trace_id, decision, end_ms)
        return decision

    def _remember(self, trace_id: bytes, decision: _Decision, end_ms: int) -> None:
        decisions = self._decisions
        decisions[trace_id] = decision
        if self._decision_ttl_ms is not None:
            self._decided_end[trace_id] = end_ms
            self._decided_by_end.push(end_ms, trace_id)
        while len(decisions) > self.policy.decision_cache_size:
            evicted, _ = decisions.popitem(last=False)
            self._decided_end.pop(evicted, None)
            self.stats.cache_evictions += 1

    def _extend_decided(self, trace_id: bytes, end_ms: int) -> None:
        """A span of a decided trace came: the decision's TTL counts from the latest end."""
        if self._decision_ttl_ms is not None and end_ms > self._decided_end[trace_id]:
            self._decided_end[trace_id] = end_ms
            self._decided_by_end.push(end_ms, trace_id)

    def _decide(self, trace_id: bytes, out: list[SampledSpan], *, early: bool) -> None:
        trace = self._traces.pop(trace_id)
        stats = self.stats
        stats.buffered_traces = len(self._traces)
        stats.buffered_spans -= len(trace.spans)
        stats.traces_decided += 1
        if early:
            stats.decided_early += 1
        reason = self._reason(trace)
        if reason is not None:
            stats.traces_kept += 1
        threshold = (
            self.policy.threshold if reason == REASON_PROBABILISTIC else ALWAYS_SAMPLE_THRESHOLD
        )
        decision = _Decision(reason is not None, reason, threshold, trace.forced)
        self._remember(trace_id, decision, trace.max_end_ns // NANOS_PER_MILLI)
        for item in trace.spans:
            self._emit(item, decision, out)

    def _emit(self, item: SampledSpan, decision: _Decision, out: list[SampledSpan]) -> None:
        """Fill in the span's outcome and hand it out (each span exactly once)."""
        stats = self.stats
        if not decision.keep:
            stats.spans_dropped += 1
            item.drop_reason = DROP_NOT_SAMPLED
            out.append(item)
            return
        limiter = self._limiter
        if (
            limiter is not None
            and not decision.exempt
            and not limiter.try_take(item.agent, self._clock_ms)
        ):
            stats.spans_dropped += 1
            stats.spans_rate_limited += 1
            item.drop_reason = DROP_RATE_LIMITED
            out.append(item)
            return
        reason = decision.reason
        assert reason is not None  # a kept decision always has its reason
        stats.spans_kept[reason] += 1
        item.keep = True
        item.reason = reason
        item.threshold = self._span_threshold(item, decision.threshold)
        out.append(item)

    def _span_threshold(self, item: SampledSpan, ours: int) -> int | None:
        """Our threshold, raised to the span's upstream ``th``; None if that ``th`` is
        inconsistent with the span's randomness (the specification says: erase it)."""
        state = parse_tracestate(item.tracestate)
        upstream = state.threshold
        if upstream is None:
            return ours
        randomness = state.randomness
        if randomness is None:
            randomness = trace_id_randomness(item.trace_id)
        if randomness < upstream:
            self.stats.upstream_th_erased += 1
            return None
        return max(ours, upstream)

    # --- progress --------------------------------------------------------------------------

    def pending_offset(self) -> int | None:
        """The smallest source offset of a span still buffered (undecided), if any."""
        return self._by_offset.peek()

    def earliest_buffered_end_ms(self) -> int | None:
        """The end time of the earliest-ending span still buffered, if any: a window holding
        it cannot know yet how many of its spans are sampled."""
        end_ns = self._by_end.peek()
        return None if end_ns is None else end_ns // NANOS_PER_MILLI

    def is_buffered(self, trace_id: bytes) -> bool:
        return trace_id in self._traces

    def holds(self, trace_id: bytes) -> bool:
        """Whether the trace is buffered or its decision remembered: a span of it coming now
        is taken as part of what came before, not as a new trace."""
        return trace_id in self._traces or trace_id in self._decisions

    def cached_decision(self, trace_id: bytes) -> bool | None:
        """Whether the cache says keep (True) or drop (False); None when not cached."""
        decision = self._decisions.get(trace_id)
        return None if decision is None else decision.keep


def _randomness(span: SpanRecord) -> int:
    """The span's 56-bit randomness: its tracestate's ``rv``, else its trace id's."""
    if span.tracestate:
        explicit = parse_tracestate(span.tracestate).randomness
        if explicit is not None:
            return explicit
    return trace_id_randomness(span.trace_id)
