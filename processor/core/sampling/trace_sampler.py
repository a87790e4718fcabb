"""Tail sampling of assembled traces, in event time: what goes to Phoenix, and why.

``TraceSampler`` buffers the spans of each trace until the trace is due, decides the whole
trace at once and remembers the decision, so that every span of a trace gets the same answer:

- **Due**: the watermark handed to ``advance`` has reached the root span's end plus the grace,
  or the first-seen span's end plus the maximum wait. Due traces are decided oldest due first.
- **Kept** when any keep policy holds; the reason is the first that applies, in the order
  ``error``, ``latency`` (max end - min start over the spans buffered), ``attribute``,
  ``probabilistic`` (the trace's randomness is at or above the policy's threshold: the same
  answer on any worker, OpenTelemetry-consistent).
- **Budgeted**, with ``budget_spans_per_second``: a trace that only the probability keeps is
  kept if its budget slot (the second of event time its latest span counts at; ``SpanBudget``)
  has room, else dropped whole with reason ``budget``. Rule keeps always go, and every span of
  a kept trace, its later spans too, is charged to the trace's slot.
- **Capped** by the per-agent rate limit, span by span in arrival order (after the budget,
  which charges the spans it lets through whether or not an agent's limit then cuts them).
- **Late spans** of a decided trace follow the cached decision at once. The cache is an LRU
  bounded in size and, given a decision TTL, forgets a trace in event time: once the watermark
  is that far past the trace's last end, as the assembler forgets a trace. A replay from a
  checkpoint then forgets it where the first run did.
- **Bounded**: past ``max_buffered_traces`` or ``max_buffered_spans`` the oldest trace (first
  seen) is decided at once on the spans it has, and counted in ``decided_early``.
- **Errors decide at once**: with ``keep_errors`` and no budget, a trace is kept on its first
  error span (no later span can change that answer, error being the first reason), with the
  spans buffered so far; its later spans follow the decision as they come, and nothing of it
  waits. Counted in ``decided_on_error``.
- **Nothing to wait for**: when only the probability can keep a trace
  (``SamplingPolicy.probability_only``), a trace is decided on its first span (its randomness
  cannot rise with more spans); its other spans follow the cached decision. Nothing is
  buffered, so a busy worker holds no spans for sampling and its windows need not wait for
  decisions. Counted in ``decided_at_once``.

Every span added comes out exactly once, as a ``SampledSpan``; ``drop_now`` lets a caller ask
first whether a span is dropped as it comes (then it is not added, and no object is made for
it). There is no wall clock and no randomness besides the trace ids': the same calls give the
same outputs.

A replay from a checkpoint starts with a fresh sampler. Without a budget a trace's answer
depends on the trace alone. With one it depends on what else charged the trace's slot, so
every outcome carries ``replay_from`` (where a replay must start to see all of that) and
``budget_replay_offset`` says where a replay must start for the decisions still to come.

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
from processor.core.sampling.budget import SpanBudget
from processor.core.sampling.policy import (
    DROP_BUDGET,
    DROP_NOT_SAMPLED,
    DROP_RATE_LIMITED,
    KEEP_REASONS,
    REASON_ATTRIBUTE,
    REASON_ERROR,
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
    spans_dropped: int = 0  # every span not forwarded: over budget and rate-limited included
    spans_over_budget: int = 0  # of spans_dropped: traces only the probability kept, no room
    spans_rate_limited: int = 0  # of spans_dropped: kept traces' spans over the rate limit
    spans_after_decision: int = 0  # late spans that followed their trace's cached decision
    upstream_th_erased: int = 0  # kept spans whose upstream th contradicted their randomness
    traces_decided: int = 0
    traces_kept: int = 0
    decided_early: int = 0  # pushed out by the buffer bounds, decided on what was there
    decided_at_once: int = 0  # on their first span: only the probability could keep them
    decided_on_error: int = 0  # on their first error span, kept: nothing could change that
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
    reason: str | None  # when kept
    drop_reason: str | None  # when dropped
    threshold: int  # this stage's threshold: ours if probabilistic, else always-sample
    at_once: bool = False  # taken before the trace was over: its later spans are not late
    # With a budget: the slot a kept trace's spans are charged to, and where a replay must
    # start to take this decision again (see SampledSpan.replay_from).
    budget_slot: int | None = None
    replay_from: int | None = None


# Decisions that depend on nothing but the trace's randomness, shared by every trace.
_NOT_SAMPLED_AT_ONCE = _Decision(False, None, DROP_NOT_SAMPLED, 0, at_once=True)


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
    # With a budget: where the caller first saw the trace, and the latest event time a
    # buffered span counts at (the trace's budget slot).
    first_offset: int = 1 << 62
    counted_ms: int = -(1 << 62)
    has_error: bool = False
    attribute_match: bool = False
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
        budget = policy.budget_spans_per_second
        self._budget = SpanBudget(budget) if budget is not None else None
        self._at_once = policy.probability_only
        # An error keeps the trace whatever else comes; with a budget the moment of the
        # decision would change which second it charges, so it waits as any other.
        self._on_error = policy.keep_errors and budget is None
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
        # With a budget: trace id -> replay_from of each remembered decision that a later span
        # follows statefully (a replay, not knowing the decision, could answer that span
        # otherwise): a checkpoint must not pass them.
        self._held: dict[bytes, int] = {}
        self._held_by_offset = LazyHeap(self._held, lambda offset: offset)
        self._clock_ms = 0  # the largest watermark seen: the rate limiter's event time
        self.stats = SamplingStats()

    # --- input -----------------------------------------------------------------------------

    def add(
        self,
        span: SpanRecord,
        agent: str,
        offset: int,
        *,
        is_invocation: bool = False,
        first_offset: int | None = None,
    ) -> list[SampledSpan]:
        """Take one attributed span from the message at ``offset``; return the spans decided
        now: none while its trace is undecided, the span itself when its trace was decided
        before, and the spans of any trace the bounds forced out. What is kept of the span is
        its ``SampledSpan``. ``first_offset``: where the caller first saw the span's trace (a
        replay from there sees the whole trace); with a budget it decides ``replay_from``."""
        out: list[SampledSpan] = []
        trace_id = span.trace_id
        item = SampledSpan.of(span, agent, offset, is_invocation)
        budget = self._budget
        counted_ms = first = 0  # used with a budget only
        if budget is not None:
            counted_ms = item.counted_ms
            first = offset if first_offset is None or first_offset > offset else first_offset
            # Whichever span a replay takes for this trace's first or latest, it may charge
            # the slot this span counts in: the slot notes where such a replay must start.
            budget.note(budget.slot_of(counted_ms), first)
        decision = self._decisions.get(trace_id)
        if decision is not None:
            self._decisions.move_to_end(trace_id)
            self._extend_decided(trace_id, span.end_ms)
            if not decision.at_once:
                self.stats.spans_after_decision += 1
            self._emit(item, decision, out)
            return out
        traces = self._traces
        if self._at_once and trace_id not in traces:
            keep = _randomness(span) >= self.policy.threshold
            decision = self._decide_at_once(trace_id, keep, span.end_ms, counted_ms, first)
            self._emit(item, decision, out)
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
        if trace.has_error and self._on_error:
            self._decide(trace_id, out, early=False, on_error=True)
            return out
        if budget is not None:
            if first < trace.first_offset:
                trace.first_offset = first
            if counted_ms > trace.counted_ms:
                trace.counted_ms = counted_ms
        return out

    def drop_now(self, span: SpanRecord) -> bool:
        """Whether ``span`` is dropped right now, its trace decided before or on this span: then
        the sampler has counted it and is done with it, and the caller counts it as dropped
        without a ``SampledSpan``. False: hand the span to ``add``.

        With only a probability most spans are dropped as they come; skipping ``add`` for them
        skips an object per span (measured in-process at p=0.1: ~15% more spans per CPU-second).
        With a budget only those are: a span dropped for the budget, or a later span of a trace
        that waited for its decision, goes to ``add``, which notes it in the budget (a replay
        that does not know the trace's decision might answer that span otherwise).
        """
        trace_id = span.trace_id
        decision = self._decisions.get(trace_id)
        if decision is None:
            if (
                not self._at_once
                or trace_id in self._traces
                or _randomness(span) >= self.policy.threshold
            ):
                return False  # buffered, or kept: ``add`` says which
            self._decide_at_once(trace_id, False, span.end_ms, 0, 0)
        elif decision.keep or (self._budget is not None and decision is not _NOT_SAMPLED_AT_ONCE):
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
            held = self._held
            for trace_id in self._decided_by_end.pop_through(self._clock_ms - ttl):
                del decisions[trace_id], decided_end[trace_id]
                held.pop(trace_id, None)
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
        if trace.randomness >= policy.threshold:
            return REASON_PROBABILISTIC
        return None

    def _decide_at_once(
        self, trace_id: bytes, keep: bool, end_ms: int, counted_ms: int, first: int
    ) -> _Decision:
        """Decide a trace on its first span (``counted_ms``: where that span counts)."""
        stats = self.stats
        stats.traces_decided += 1
        stats.decided_at_once += 1
        budget = self._budget
        if not keep:
            decision = _NOT_SAMPLED_AT_ONCE
        elif budget is None:
            decision = _Decision(True, REASON_PROBABILISTIC, None, self.policy.threshold, True)
        else:
            slot = budget.slot_of(counted_ms)
            noted = budget.first_offset(slot)
            replay_from = first if noted is None or noted > first else noted
            if budget.admits(slot):
                decision = _Decision(
                    True, REASON_PROBABILISTIC, None, self.policy.threshold, True, slot, replay_from
                )
            else:
                decision = _Decision(
                    False, None, DROP_BUDGET, self.policy.threshold, True, None, replay_from
                )
            keep = decision.keep
        if keep:
            stats.traces_kept += 1
        self._remember(trace_id, decision, end_ms)
        return decision

    def _remember(self, trace_id: bytes, decision: _Decision, end_ms: int) -> None:
        decisions = self._decisions
        decisions[trace_id] = decision
        if self._decision_ttl_ms is not None:
            self._decided_end[trace_id] = end_ms
            self._decided_by_end.push(end_ms, trace_id)
        replay_from = decision.replay_from
        if replay_from is not None:
            self._held[trace_id] = replay_from
            self._held_by_offset.push(replay_from, trace_id)
        while len(decisions) > self.policy.decision_cache_size:
            evicted, _ = decisions.popitem(last=False)
            self._decided_end.pop(evicted, None)
            self._held.pop(evicted, None)
            self.stats.cache_evictions += 1

    def _extend_decided(self, trace_id: bytes, end_ms: int) -> None:
        """A span of a decided trace came: the decision's TTL counts from the latest end."""
        if self._decision_ttl_ms is not None and end_ms > self._decided_end[trace_id]:
            self._decided_end[trace_id] = end_ms
            self._decided_by_end.push(end_ms, trace_id)

    def _decide(
        self, trace_id: bytes, out: list[SampledSpan], *, early: bool, on_error: bool = False
    ) -> None:
        trace = self._traces.pop(trace_id)
        stats = self.stats
        stats.buffered_traces = len(self._traces)
        stats.buffered_spans -= len(trace.spans)
        stats.traces_decided += 1
        if early:
            stats.decided_early += 1
        if on_error:
            stats.decided_on_error += 1
        reason = self._reason(trace)
        drop_reason = None if reason is not None else DROP_NOT_SAMPLED
        threshold = (
            self.policy.threshold if reason == REASON_PROBABILISTIC else ALWAYS_SAMPLE_THRESHOLD
        )
        budget = self._budget
        if budget is None:
            # Decided on an error, the trace's later spans follow the decision without being late.
            decision = _Decision(reason is not None, reason, drop_reason, threshold, on_error)
        else:
            slot = budget.slot_of(trace.counted_ms)
            # A rule's answer, or no, depends on the trace alone: a replay from its first
            # offset gives it again. Room in the slot depends on every trace that charged it.
            replay_from = trace.first_offset
            if reason == REASON_PROBABILISTIC:
                noted = budget.first_offset(slot)
                if noted is not None and noted < replay_from:
                    replay_from = noted
                if not budget.admits(slot):
                    reason, drop_reason = None, DROP_BUDGET
            keep = reason is not None
            decision = _Decision(
                keep, reason, drop_reason, threshold, False, slot if keep else None, replay_from
            )
        if decision.keep:
            stats.traces_kept += 1
        self._remember(trace_id, decision, trace.max_end_ns // NANOS_PER_MILLI)
        for item in trace.spans:
            self._emit(item, decision, out)

    def _emit(self, item: SampledSpan, decision: _Decision, out: list[SampledSpan]) -> None:
        """Fill in the span's outcome and hand it out (each span exactly once)."""
        stats = self.stats
        if decision.replay_from is not None:
            item.replay_from = decision.replay_from
        if not decision.keep:
            stats.spans_dropped += 1
            if decision.drop_reason == DROP_BUDGET:
                stats.spans_over_budget += 1
            item.drop_reason = decision.drop_reason
            out.append(item)
            return
        slot, budget = decision.budget_slot, self._budget
        if slot is not None and budget is not None:
            budget.charge(slot)
        limiter = self._limiter
        if limiter is not None and not limiter.try_take(item.agent, self._clock_ms):
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

    def budget_replay_offset(self, counted_from_ms: int | None) -> int | None:
        """With a budget, the smallest offset a replay may start from (with a fresh sampler)
        and still take every decision to come, and follow every decision remembered, as this
        sampler will; None without a budget, or when nothing holds a replay back.

        ``counted_from_ms``: no span handed in from now on counts (``SampledSpan.counted_ms``)
        before it; None if the caller cannot say.
        """
        budget = self._budget
        if budget is None:
            return None
        # Slots that decisions to come may look at: those of the spans to come and of the
        # buffered ones (each counts at its end or later).
        floor = counted_from_ms
        buffered = self.earliest_buffered_end_ms()
        if floor is not None and buffered is not None and buffered < floor:
            floor = buffered
        offsets = [budget.min_first_offset(floor), self._held_by_offset.peek()]
        found = [offset for offset in offsets if offset is not None]
        return min(found) if found else None

    def forget_budget_before(self, counted_from_ms: int) -> None:
        """No span handed in from now on counts before ``counted_from_ms``: the budget slots
        before it and before every buffered span can go (bounded memory)."""
        budget = self._budget
        if budget is None:
            return
        buffered = self.earliest_buffered_end_ms()
        budget.forget_before(
            counted_from_ms if buffered is None else min(buffered, counted_from_ms)
        )

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
