"""The trace sampler: consistent decisions per trace, tail policies and their reasons, decision
timing in event time, the decision cache, the memory bounds, the rate limit and the span
budget; and what a forwarded span carries."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from spanbuilder import T0_MS, record, span_pb

from processor.core.sampling import (
    DROP_BUDGET,
    DROP_NOT_SAMPLED,
    DROP_RATE_LIMITED,
    SAMPLING_REASON_ATTRIBUTE,
    OtelTraceState,
    SampledSpan,
    SamplingPolicy,
    TraceSampler,
    mark_forwarded,
    parse_tracestate,
    probability_to_threshold,
    th_to_threshold,
)
from processor.core.sampling.threshold import MAX_ADJUSTED_COUNT, trace_id_randomness
from processor.core.spans import MessageSource, SpanRecord

LUCKY = MAX_ADJUSTED_COUNT - 1  # randomness every probability keeps
UNLUCKY = 0  # randomness only p=1 keeps
FAR_FUTURE_MS = T0_MS + 10**9
TH_10_PERCENT = "e6666666666666"


def trace_id(n: int, randomness: int = UNLUCKY) -> int:
    """A trace id (as the int ``record`` takes) whose last 7 bytes hold ``randomness``."""
    return (n << 56) | randomness


def make(
    *,
    trace: int = trace_id(1),
    span: int = 1,
    parent: int | None = None,
    end_ms: int = T0_MS + 100,
    duration_ms: int = 100,
    error: bool = False,
    attrs: dict[str, Any] | None = None,
    tracestate: str = "",
) -> SpanRecord:
    """A span record with its protobuf span, as the decoder makes them."""
    rec = record(
        trace=trace, span=span, parent=parent, end_ms=end_ms, duration_ms=duration_ms, error=error
    )
    rec.tracestate = tracestate
    pb = span_pb(
        trace=rec.trace_id,
        span=span,
        parent=parent,
        start_ns=rec.start_ns,
        end_ns=rec.end_ns,
        attrs=attrs,
        error=error,
    )
    pb.trace_state = tracestate
    rec.source = MessageSource([pb])
    return rec


def policy(**overrides: Any) -> SamplingPolicy:
    settings_: dict[str, Any] = {"decision_grace_ms": 0, "probability": 0.1}
    settings_.update(overrides)
    return SamplingPolicy(**settings_)


def feed(
    sampler: TraceSampler, spans: list[SpanRecord], agent: str = "planner"
) -> list[SampledSpan]:
    out: list[SampledSpan] = []
    for offset, item in enumerate(spans):
        out += sampler.add(item, agent, offset)
    return out


def decide_all(sampler: TraceSampler, spans: list[SpanRecord]) -> list[SampledSpan]:
    return feed(sampler, spans) + sampler.advance(FAR_FUTURE_MS)


def outcome(item: SampledSpan) -> tuple[bool, str | None, str | None, int | None]:
    return item.keep, item.reason, item.drop_reason, item.threshold


def ids(span: SpanRecord | SampledSpan) -> tuple[bytes, bytes]:
    """Which span: a record and its sampling outcome share trace and span ids."""
    return span.trace_id, span.span_id


def by_span(out: list[SampledSpan]) -> dict[tuple[bytes, bytes], SampledSpan]:
    found = {(item.trace_id, item.span_id): item for item in out}
    assert len(found) == len(out), "a span came out twice"
    return found


# --- consistent probability sampling -------------------------------------------------------------


def test_a_10_percent_sampler_keeps_10_percent_of_100000_random_traces() -> None:
    rng = random.Random(20240605)
    n, p, batch = 100_000, 0.1, 1_000
    threshold = probability_to_threshold(p)
    sampler = TraceSampler(policy(probability=p))
    kept = 0
    ths: set[str | None] = set()
    for _ in range(n // batch):  # in batches: few objects alive at a time
        spans = [record(trace=rng.getrandbits(128)) for _ in range(batch)]
        out = feed(sampler, spans) + sampler.advance(FAR_FUTURE_MS)
        assert len(out) == batch
        expected = [trace_id_randomness(item.trace_id) >= threshold for item in out]
        assert [item.keep for item in out] == expected
        kept += sum(expected)
        ths.update(item.th for item in out if item.keep)
        assert {item.drop_reason for item in out if not item.keep} == {DROP_NOT_SAMPLED}
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * p) <= 4 * sigma, (kept, sigma)
    assert ths == {TH_10_PERCENT}
    assert sampler.stats.spans_kept["probabilistic"] == kept
    assert sampler.stats.spans_dropped == n - kept


def random_traces(rng: random.Random, count: int) -> list[SpanRecord]:
    """Traces of 1..6 spans (a root and children), some failed, some slow, some flagged."""
    spans: list[SpanRecord] = []
    for _ in range(count):
        trace = rng.getrandbits(128)
        size = rng.randint(1, 6)
        end = T0_MS + rng.randint(0, 60_000)
        for span in range(1, size + 1):
            spans.append(
                make(
                    trace=trace,
                    span=span,
                    parent=None if span == 1 else 1,
                    end_ms=end - (span > 1) * rng.randint(1, 500),
                    duration_ms=rng.choice([10, 100, 6_000]),
                    error=rng.random() < 0.05,
                    attrs={"user.id": "flagged"} if rng.random() < 0.02 else None,
                )
            )
    return spans


def test_two_samplers_give_every_span_of_a_trace_the_same_answer_in_any_arrival_order() -> None:
    rng = random.Random(7)
    spans = random_traces(rng, 2_000)
    shuffled = spans[:]
    rng.shuffle(shuffled)
    tail = policy(latency_threshold_ms=5_000, attribute_matches={"user.id": frozenset({"flagged"})})
    first = by_span(decide_all(TraceSampler(tail), spans))
    second = by_span(decide_all(TraceSampler(tail), shuffled))
    assert first.keys() == second.keys() == {(s.trace_id, s.span_id) for s in spans}
    per_trace: dict[bytes, set[tuple[bool, str | None]]] = defaultdict(set)
    for key, item in first.items():
        assert outcome(item) == outcome(second[key])
        per_trace[key[0]].add((item.keep, item.reason))
    assert all(len(answers) == 1 for answers in per_trace.values())
    reasons = Counter(item.reason for item in first.values())
    assert set(reasons) == {"error", "latency", "attribute", "probabilistic", None}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 11), st.integers(0, 3), st.booleans()), min_size=1, max_size=60
    ),
    st.randoms(use_true_random=False),
    st.integers(1, 4),
    st.integers(1, 8),
    st.integers(0, 3),
)
def test_probabilistic_answers_hold_under_any_timing_bounds_and_cache_size(
    plan: list[tuple[int, int, bool]],
    rng: random.Random,
    max_traces: int,
    max_spans: int,
    cache_size: int,
) -> None:
    """Whatever the arrival order, the advances in between, the bounds and the cache evictions,
    every span comes out exactly once, and its answer is its trace id's."""
    spans = [
        make(
            trace=(trace + 1) * 0x9E3779B97F4A7C15,  # spread over the randomness
            span=index + 1,
            parent=None if is_root else 10_000,
            end_ms=T0_MS + 1_000 * step,
        )
        for index, (trace, step, is_root) in enumerate(plan)
    ]
    p = 0.5
    threshold = probability_to_threshold(p)
    answers: list[dict[tuple[bytes, bytes], SampledSpan]] = []
    for order in (spans, rng.sample(spans, len(spans))):
        sampler = TraceSampler(
            policy(
                probability=p,
                keep_errors=False,
                decision_max_wait_ms=1_500,
                max_buffered_traces=max_traces,
                max_buffered_spans=max_spans,
                decision_cache_size=cache_size,
            )
        )
        out: list[SampledSpan] = []
        for offset, item in enumerate(order):
            out += sampler.add(item, "agent", offset)
            if rng.random() < 0.3:
                out += sampler.advance(item.end_ms - rng.randint(0, 2_000))
        out += sampler.advance(FAR_FUTURE_MS)
        found = by_span(out)
        assert len(found) == len(spans)
        for sampled in out:
            assert sampled.keep == (trace_id_randomness(sampled.trace_id) >= threshold)
        assert sampler.stats.buffered_spans == sampler.stats.buffered_traces == 0
        assert sampler.pending_offset() is None
        answers.append(found)
    assert {k: outcome(v) for k, v in answers[0].items()} == {
        k: outcome(v) for k, v in answers[1].items()
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 3), st.booleans(), st.booleans()),
        min_size=1,
        max_size=50,
    ),
    st.randoms(use_true_random=False),
    st.integers(1, 4),
    st.integers(1, 8),
    st.integers(0, 3),
)
def test_every_span_comes_out_once_and_is_counted_once_with_every_policy_on(
    plan: list[tuple[int, int, bool, bool]],
    rng: random.Random,
    max_traces: int,
    max_spans: int,
    cache_size: int,
) -> None:
    spans = [
        make(
            trace=(trace + 1) * 0x9E3779B97F4A7C15,
            span=index + 1,
            parent=None if is_root else 10_000,
            end_ms=T0_MS + 1_000 * step,
            duration_ms=rng.choice([10, 3_000]),
            error=failed,
        )
        for index, (trace, step, is_root, failed) in enumerate(plan)
    ]
    sampler = TraceSampler(
        policy(
            probability=0.5,
            latency_threshold_ms=2_000,
            agent_spans_per_second=1,
            budget_spans_per_second=2,
            decision_max_wait_ms=1_500,
            max_buffered_traces=max_traces,
            max_buffered_spans=max_spans,
            decision_cache_size=cache_size,
        )
    )
    out: list[SampledSpan] = []
    for offset, item in enumerate(spans):
        out += sampler.add(item, rng.choice(["a", "b"]), offset)
        if rng.random() < 0.3:
            out += sampler.advance(item.end_ms - rng.randint(0, 2_000))
        stats = sampler.stats
        assert stats.buffered_traces <= max_traces
        assert stats.buffered_spans <= max_spans
    out += sampler.advance(FAR_FUTURE_MS)
    assert len(by_span(out)) == len(spans)
    stats = sampler.stats
    assert stats.spans_kept_total + stats.spans_dropped == len(spans)
    assert stats.spans_kept_total == sum(item.keep for item in out)
    assert stats.spans_rate_limited == sum(i.drop_reason == DROP_RATE_LIMITED for i in out)
    assert stats.spans_over_budget == sum(i.drop_reason == DROP_BUDGET for i in out)
    assert all((item.reason is None) != item.keep for item in out)
    assert all((item.drop_reason is None) == item.keep for item in out)


def test_the_same_calls_give_the_same_outputs() -> None:
    spans = random_traces(random.Random(3), 300)

    def run() -> list[tuple[bytes, bytes, bool, str | None, str | None, int | None]]:
        sampler = TraceSampler(
            policy(
                latency_threshold_ms=5_000,
                agent_spans_per_second=5,
                budget_spans_per_second=3,
                max_buffered_traces=50,
            )
        )
        out: list[SampledSpan] = []
        for offset, item in enumerate(spans):
            out += sampler.add(item, f"agent-{offset % 3}", offset)
            if offset % 10 == 0:
                out += sampler.advance(item.end_ms - 1_000)
        out += sampler.advance(FAR_FUTURE_MS)
        return [(i.trace_id, i.span_id, *outcome(i)) for i in out]

    assert run() == run()


# --- tail policies and their reasons -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "reason"),
    [
        pytest.param([make(error=True)], "error", id="error"),
        pytest.param([make(duration_ms=5_000)], "latency", id="latency-at-threshold"),
        pytest.param([make(duration_ms=4_999)], None, id="latency-below"),
        pytest.param(
            # no single span is slow; the trace, from first start to last end, is
            [
                make(span=2, parent=1, end_ms=T0_MS + 3_000, duration_ms=3_000),
                make(span=1, end_ms=T0_MS + 5_000, duration_ms=1_000),
            ],
            "latency",
            id="latency-over-the-trace",
        ),
        pytest.param([make(attrs={"session.id": "s-42"})], "attribute", id="attribute"),
        pytest.param([make(attrs={"session.id": "s-43"})], None, id="attribute-other-value"),
        pytest.param([make(trace=trace_id(1, LUCKY))], "probabilistic", id="probabilistic"),
        pytest.param(
            [make(trace=trace_id(1, LUCKY), error=True, duration_ms=9_000)],
            "error",
            id="error-first",
        ),
        pytest.param(
            [make(attrs={"session.id": "s-42"}, duration_ms=9_000)],
            "latency",
            id="latency-before-attribute",
        ),
        pytest.param(
            [make(span=2, parent=1, error=True), make(span=1)], "error", id="any-span-failed"
        ),
    ],
)
def test_keep_policies_and_their_reason_in_priority_order(
    spans: list[SpanRecord], reason: str | None
) -> None:
    sampler = TraceSampler(
        policy(latency_threshold_ms=5_000, attribute_matches={"session.id": frozenset({"s-42"})})
    )
    out = decide_all(sampler, spans)
    assert [item.reason for item in out] == [reason] * len(spans)
    assert all(item.keep == (reason is not None) for item in out)


def test_errors_are_dropped_when_keep_errors_is_off() -> None:
    sampler = TraceSampler(policy(keep_errors=False))
    assert [item.keep for item in decide_all(sampler, [make(error=True)])] == [False]


def test_rule_keeps_carry_th_0_and_probabilistic_keeps_carry_ours() -> None:
    sampler = TraceSampler(policy(probability=0.1))
    out = decide_all(
        sampler,
        [make(trace=trace_id(1), error=True), make(trace=trace_id(2, LUCKY))],
    )
    assert [(item.reason, item.th, item.adjusted_count) for item in out] == [
        ("error", "0", 1.0),
        ("probabilistic", TH_10_PERCENT, pytest.approx(10.0)),
    ]


# --- upstream th and rv --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "randomness", "tracestate", "expected"),
    [
        # sampled at 10% upstream, 50% here: still 10%, and the th says so
        pytest.param(0.5, LUCKY, f"ot=th:{TH_10_PERCENT}", (True, TH_10_PERCENT), id="upstream"),
        # 10% upstream, 1% here: ours is the higher threshold
        pytest.param(0.01, LUCKY, f"ot=th:{TH_10_PERCENT}", (True, "fd70a3d70a3d71"), id="ours"),
        pytest.param(0.01, 0xF0 << 48, f"ot=th:{TH_10_PERCENT}", (False, None), id="dropped"),
        # kept by a rule: th is the upstream one (this stage keeps with certainty)
        pytest.param(0.0, UNLUCKY, "ot=rv:ffffffffffffff;th:c", (True, "c"), id="rule-keep"),
        # the randomness contradicts the upstream th: the th is erased
        pytest.param(1.0, 0x10 << 48, f"ot=th:{TH_10_PERCENT}", (True, None), id="inconsistent"),
        # an explicit rv replaces the trace id's randomness
        pytest.param(0.5, UNLUCKY, "ot=rv:ffffffffffffff", (True, "8"), id="rv-keeps"),
        pytest.param(0.5, LUCKY, "ot=rv:00000000000000", (False, None), id="rv-drops"),
    ],
)
def test_upstream_threshold_is_honoured(
    ours: float, randomness: int, tracestate: str, expected: tuple[bool, str | None]
) -> None:
    rule_keep = ours == 0.0
    sampler = TraceSampler(policy(probability=ours))
    spans = [make(trace=trace_id(1, randomness), tracestate=tracestate, error=rule_keep)]
    [item] = decide_all(sampler, spans)
    assert (item.keep, item.th) == expected
    assert sampler.stats.upstream_th_erased == (item.keep and item.th is None)


def test_adjusted_count_of_a_10_percent_upstream_trace_is_10() -> None:
    sampler = TraceSampler(policy(probability=1.0))
    [item] = decide_all(sampler, [make(trace=trace_id(1, LUCKY), tracestate="ot=th:e66")])
    assert item.th == "e66"
    assert item.adjusted_count == pytest.approx(10.0, rel=1e-3)


# --- when a trace is decided ---------------------------------------------------------------------


def test_a_trace_is_decided_when_the_watermark_passes_its_root_end_plus_grace() -> None:
    sampler = TraceSampler(policy(decision_grace_ms=2_000, probability=1.0))
    child = make(span=2, parent=1, end_ms=T0_MS + 500)
    root = make(span=1, end_ms=T0_MS + 1_000)
    assert sampler.add(child, "a", 0) == []
    assert sampler.add(root, "a", 1) == []
    assert sampler.advance(T0_MS + 2_999) == []
    assert sampler.is_buffered(root.trace_id)
    out = sampler.advance(T0_MS + 3_000)
    assert [ids(item) for item in out] == [ids(child), ids(root)]  # arrival order in a trace
    assert sampler.stats.traces_decided == 1


def test_a_trace_without_its_root_is_decided_after_the_maximum_wait() -> None:
    sampler = TraceSampler(policy(decision_max_wait_ms=30_000, probability=1.0))
    first = make(span=2, parent=1, end_ms=T0_MS)
    later = make(span=3, parent=1, end_ms=T0_MS + 20_000)
    sampler.add(first, "a", 0)
    sampler.add(later, "a", 1)
    assert sampler.advance(T0_MS + 29_999) == []
    assert len(sampler.advance(T0_MS + 30_000)) == 2  # measured from the first-seen span


def test_the_earlier_of_root_grace_and_maximum_wait_decides() -> None:
    sampler = TraceSampler(
        policy(decision_grace_ms=5_000, decision_max_wait_ms=3_000, probability=1.0)
    )
    sampler.add(make(span=1, end_ms=T0_MS), "a", 0)
    assert len(sampler.advance(T0_MS + 3_000)) == 1


def test_due_traces_come_out_earliest_due_first() -> None:
    sampler = TraceSampler(policy(probability=1.0))
    late_root = make(trace=trace_id(1), span=1, end_ms=T0_MS + 900)
    early_root = make(trace=trace_id(2), span=1, end_ms=T0_MS + 100)
    sampler.add(late_root, "a", 0)
    sampler.add(early_root, "a", 1)
    assert [ids(item) for item in sampler.advance(T0_MS + 1_000)] == [
        ids(early_root),
        ids(late_root),
    ]


def test_a_late_root_decides_its_trace_at_the_next_advance() -> None:
    sampler = TraceSampler(policy(decision_grace_ms=1_000, probability=1.0))
    sampler.advance(T0_MS + 10_000)
    assert sampler.add(make(span=1, end_ms=T0_MS), "a", 0) == []
    assert len(sampler.advance(T0_MS + 10_000)) == 1


# --- the decision cache --------------------------------------------------------------------------


@pytest.mark.parametrize(("randomness", "keep"), [(LUCKY, True), (UNLUCKY, False)])
def test_late_spans_follow_their_trace_decision_at_once(randomness: int, keep: bool) -> None:
    sampler = TraceSampler(policy())
    trace = trace_id(1, randomness)
    decide_all(sampler, [make(trace=trace, span=1)])
    late = make(trace=trace, span=2, parent=1, error=True)  # an error cannot revive it
    [item] = sampler.add(late, "a", 5)
    assert (ids(item), item.keep, item.offset) == (ids(late), keep, 5)
    assert sampler.stats.spans_after_decision == 1
    assert sampler.stats.buffered_spans == 0


def test_the_cache_is_bounded_and_counts_evictions() -> None:
    sampler = TraceSampler(policy(decision_cache_size=2))
    decide_all(sampler, [make(trace=trace_id(n, LUCKY)) for n in (1, 2, 3)])
    assert sampler.stats.cache_evictions == 1
    assert sampler.cached_decision(trace_id(1, LUCKY).to_bytes(16, "big")) is None
    assert sampler.cached_decision(trace_id(3, LUCKY).to_bytes(16, "big")) is True
    # the evicted trace's late span is buffered again, and decided again the same way
    late = make(trace=trace_id(1, LUCKY), span=2, parent=1)
    assert sampler.add(late, "a", 9) == []
    assert [item.keep for item in sampler.advance(FAR_FUTURE_MS)] == [True]


def test_a_cache_hit_refreshes_the_entry() -> None:
    sampler = TraceSampler(policy(decision_cache_size=2))
    one, two, three = (trace_id(n, LUCKY) for n in (1, 2, 3))
    decide_all(sampler, [make(trace=one), make(trace=two)])
    sampler.add(make(trace=one, span=2, parent=1), "a", 5)  # touches trace one
    decide_all(sampler, [make(trace=three)])
    assert sampler.cached_decision(one.to_bytes(16, "big")) is True
    assert sampler.cached_decision(two.to_bytes(16, "big")) is None


def test_with_a_ttl_a_decision_is_forgotten_in_event_time_after_its_trace_last_end() -> None:
    sampler = TraceSampler(policy(), decision_ttl_ms=1_000)
    trace = trace_id(1, LUCKY)
    key = trace.to_bytes(16, "big")
    feed(sampler, [make(trace=trace, span=1, end_ms=T0_MS)])
    assert [item.keep for item in sampler.advance(T0_MS)] == [True]
    # a span of the decided trace follows the decision, and the TTL counts from its end
    [item] = sampler.add(make(trace=trace, span=2, parent=1, end_ms=T0_MS + 500), "a", 2)
    assert item.keep
    sampler.advance(T0_MS + 1_499)
    assert sampler.holds(key) and sampler.cached_decision(key) is True
    sampler.advance(T0_MS + 1_500)
    assert not sampler.holds(key) and sampler.cached_decision(key) is None
    assert sampler.stats.decisions_expired == 1
    # a straggler past the TTL starts the trace afresh: buffered, and decided on its own
    assert sampler.add(make(trace=trace, span=3, parent=1, end_ms=T0_MS + 600), "a", 3) == []
    assert sampler.holds(key)


def test_without_a_ttl_a_decision_stays_as_long_as_the_cache_has_room() -> None:
    sampler = TraceSampler(policy())
    trace = trace_id(1, LUCKY)
    decide_all(sampler, [make(trace=trace, end_ms=T0_MS)])
    sampler.advance(FAR_FUTURE_MS + 10**9)
    assert sampler.cached_decision(trace.to_bytes(16, "big")) is True
    assert sampler.stats.decisions_expired == 0


# --- memory bounds -------------------------------------------------------------------------------


def test_past_the_trace_limit_the_oldest_trace_is_decided_early() -> None:
    sampler = TraceSampler(policy(max_buffered_traces=2, probability=1.0))
    spans = [make(trace=trace_id(n), end_ms=T0_MS + n) for n in (1, 2, 3)]
    assert sampler.add(spans[0], "a", 0) == []
    assert sampler.add(spans[1], "a", 1) == []
    [early] = sampler.add(spans[2], "a", 2)
    assert ids(early) == ids(spans[0])
    stats = sampler.stats
    assert (stats.decided_early, stats.buffered_traces, stats.buffered_spans) == (1, 2, 2)
    assert sampler.pending_offset() == 1


def test_past_the_span_limit_even_the_spans_own_trace_is_decided_early() -> None:
    sampler = TraceSampler(policy(max_buffered_spans=3))
    spans = [make(span=n, parent=1, error=(n == 5)) for n in (2, 3, 4, 5)]
    assert feed(sampler, spans[:3]) == []
    out = sampler.add(spans[3], "a", 3)
    # decided on the three spans it had (no error among them); the fourth follows
    assert [(ids(item), item.keep) for item in out] == [(ids(s), False) for s in spans]
    assert sampler.stats.decided_early == 1
    assert sampler.stats.buffered_spans == 0


def test_early_decisions_use_the_same_policies() -> None:
    sampler = TraceSampler(policy(max_buffered_traces=1, latency_threshold_ms=50))
    sampler.add(make(trace=trace_id(1), duration_ms=100), "a", 0)
    [item] = sampler.add(make(trace=trace_id(2)), "a", 1)
    assert (item.keep, item.reason) == (True, "latency")


def test_a_trace_is_kept_on_its_first_error_span_and_its_later_spans_follow_at_once() -> None:
    sampler = TraceSampler(policy(latency_threshold_ms=50))
    root = make(trace=trace_id(1), span=1, end_ms=T0_MS + 900)
    child = make(trace=trace_id(1), span=2, parent=1, end_ms=T0_MS + 200)
    failed = make(trace=trace_id(1), span=3, parent=1, end_ms=T0_MS + 300, error=True)
    other = make(trace=trace_id(2), span=1, end_ms=T0_MS + 100)
    assert sampler.add(child, "a", 0) == []
    assert sampler.add(other, "a", 1) == []
    decided = sampler.add(failed, "a", 2)
    assert [(ids(item), item.keep, item.reason) for item in decided] == [
        (ids(child), True, "error"),
        (ids(failed), True, "error"),
    ], "the spans buffered so far, with the error's reason"
    [later] = sampler.add(root, "a", 3)
    assert (ids(later), later.keep, later.reason) == (ids(root), True, "error")
    stats = sampler.stats
    assert (stats.decided_on_error, stats.spans_after_decision) == (1, 0)
    # only the trace without an error still waits, and holds windows and commits back
    assert sampler.pending_offset() == 1
    assert sampler.earliest_buffered_end_ms() == T0_MS + 100


@pytest.mark.parametrize(
    "overrides",
    [{"budget_spans_per_second": 10.0}, {"keep_errors": False}],
    ids=["with-a-budget", "errors-not-kept"],
)
def test_an_error_decides_nothing_at_once_with_a_budget_or_when_errors_are_not_kept(
    overrides: dict[str, Any],
) -> None:
    sampler = TraceSampler(policy(latency_threshold_ms=5_000, **overrides))  # traces wait
    assert sampler.add(make(trace=trace_id(1), error=True), "a", 0) == []
    assert sampler.stats.decided_on_error == 0
    [decided] = sampler.advance(FAR_FUTURE_MS)
    assert decided.keep is overrides.get("keep_errors", True)


def test_pending_offset_is_the_smallest_offset_still_buffered() -> None:
    sampler = TraceSampler(policy(probability=1.0))
    assert sampler.pending_offset() is None
    sampler.add(make(trace=trace_id(1), span=2, parent=1, end_ms=T0_MS + 5_000), "a", 7)
    sampler.add(make(trace=trace_id(2), span=1, end_ms=T0_MS), "a", 9)
    sampler.add(make(trace=trace_id(1), span=3, parent=1, end_ms=T0_MS + 5_000), "a", 4)
    assert sampler.pending_offset() == 4
    assert sampler.earliest_buffered_end_ms() == T0_MS
    sampler.advance(T0_MS + 1_000)  # trace 2 decided, trace 1 waits for its root
    assert sampler.pending_offset() == 4
    assert sampler.earliest_buffered_end_ms() == T0_MS + 5_000
    sampler.advance(FAR_FUTURE_MS)
    assert sampler.pending_offset() is None
    assert sampler.earliest_buffered_end_ms() is None


# --- the rate limit ------------------------------------------------------------------------------


def test_a_big_kept_trace_is_cut_to_the_agents_budget_in_arrival_order() -> None:
    sampler = TraceSampler(policy(probability=1.0, agent_spans_per_second=10))
    spans = [make(span=n, parent=None if n == 1 else 1) for n in range(1, 51)]
    out = decide_all(sampler, spans)
    assert [item.keep for item in out] == [True] * 10 + [False] * 40
    assert {item.drop_reason for item in out[10:]} == {DROP_RATE_LIMITED}
    stats = sampler.stats
    assert (stats.spans_rate_limited, stats.spans_dropped, stats.spans_kept_total) == (40, 40, 10)


def test_the_rate_limit_caps_spans_per_second_of_event_time_per_agent() -> None:
    rate = 20
    sampler = TraceSampler(policy(probability=1.0, agent_spans_per_second=rate))
    out: list[SampledSpan] = []
    seconds = 10
    for i in range(100 * seconds):  # 100 traces per second of event time, one span each
        end = T0_MS + i * 10
        agent = ("planner", "searcher")[i % 2]
        out += sampler.add(make(trace=trace_id(i + 1), end_ms=end), agent, i)
        out += sampler.advance(end)
    kept = Counter(item.agent for item in out if item.keep)
    for agent in ("planner", "searcher"):
        # one second's burst, then the refill rate
        assert rate * (seconds - 1) <= kept[agent] <= rate * seconds + rate


def test_rate_limited_spans_are_not_kept_by_late_arrivals_either() -> None:
    sampler = TraceSampler(policy(probability=1.0, agent_spans_per_second=1))
    decide_all(sampler, [make(span=1)])
    [late] = sampler.add(make(span=2, parent=1), "planner", 1)
    assert (late.keep, late.drop_reason) == (False, DROP_RATE_LIMITED)
    sampler.advance(FAR_FUTURE_MS + 1_000)  # a second later the bucket has a token again
    [later] = sampler.add(make(span=3, parent=1), "planner", 2)
    assert later.keep


# --- the span budget ----------------------------------------------------------------------------


def budget_trace(
    n: int, *, spans: int = 1, at_ms: int = 0, error: bool = False, lucky: bool = True
) -> list[SpanRecord]:
    """Trace ``n``: a root ending at ``T0_MS + at_ms`` and ``spans - 1`` children ending
    just before it (in the same second); ``lucky`` traces the probability keeps."""
    trace = trace_id(n, LUCKY if lucky else UNLUCKY)
    root = make(trace=trace, span=100 * n, end_ms=T0_MS + at_ms, error=error)
    children = [
        make(trace=trace, span=100 * n + k, parent=100 * n, end_ms=T0_MS + at_ms - k)
        for k in range(1, spans)
    ]
    return [*children, root]


def answers(out: list[SampledSpan]) -> dict[int, set[str | None]]:
    """Trace number -> the reasons its spans were kept or dropped for."""
    found: dict[int, set[str | None]] = defaultdict(set)
    for item in out:
        found[int.from_bytes(item.trace_id, "big") >> 56].add(item.reason or item.drop_reason)
    return dict(found)


_P = "probabilistic"


@pytest.mark.parametrize(
    ("traces", "expected"),
    [
        pytest.param(
            [budget_trace(1, spans=3, at_ms=10), budget_trace(2, at_ms=20)],
            {1: {_P}, 2: {DROP_BUDGET}},
            id="over-budget-dropped",
        ),
        pytest.param(
            # room left for one span: the trace is kept whole, past the budget; the next waits
            [
                budget_trace(1, spans=2, at_ms=10),
                budget_trace(2, spans=5, at_ms=20),
                budget_trace(3, spans=4, at_ms=30),
            ],
            {1: {_P}, 2: {_P}, 3: {DROP_BUDGET}},
            id="dropped-whole-kept-whole",
        ),
        pytest.param(
            [
                budget_trace(1, spans=3, at_ms=10),
                budget_trace(2, spans=2, at_ms=20, error=True),
                budget_trace(3, at_ms=30),
            ],
            {1: {_P}, 2: {"error"}, 3: {DROP_BUDGET}},
            id="rules-keep-over-budget",
        ),
        pytest.param(
            # a rule's keep uses the budget: nothing is left for chance
            [budget_trace(1, spans=3, at_ms=10, error=True), budget_trace(2, at_ms=20)],
            {1: {"error"}, 2: {DROP_BUDGET}},
            id="rules-use-the-budget",
        ),
        pytest.param(
            [
                budget_trace(1, spans=3, at_ms=10),
                budget_trace(2, at_ms=990),
                budget_trace(3, at_ms=1_000),
                budget_trace(4, spans=3, at_ms=2_500),
            ],
            {1: {_P}, 2: {DROP_BUDGET}, 3: {_P}, 4: {_P}},
            id="refills-every-event-time-second",
        ),
        pytest.param(
            [budget_trace(1, at_ms=10, lucky=False), budget_trace(2, spans=3, at_ms=20)],
            {1: {DROP_NOT_SAMPLED}, 2: {_P}},
            id="not-sampled-uses-nothing",
        ),
    ],
)
@pytest.mark.parametrize("budget", [3, None])
def test_the_budget_keeps_what_rules_keep_and_what_chance_keeps_while_its_second_has_room(
    traces: list[list[SpanRecord]], expected: dict[int, set[str | None]], budget: int | None
) -> None:
    sampler = TraceSampler(policy(probability=0.5, budget_spans_per_second=budget))
    out = decide_all(sampler, [span for trace in traces for span in trace])
    if budget is None:  # no budget: chance keeps what the budget dropped
        expected = {n: {_P} if r == {DROP_BUDGET} else r for n, r in expected.items()}
    assert answers(out) == expected
    assert sampler.stats.spans_over_budget == sum(i.drop_reason == DROP_BUDGET for i in out)


def test_with_only_a_probability_later_spans_follow_and_use_the_budget() -> None:
    sampler = TraceSampler(policy(keep_errors=False, budget_spans_per_second=3))
    one, two, three = (trace_id(n, LUCKY) for n in (1, 2, 3))
    first = [
        make(trace=one, span=n, parent=None if n == 1 else 1, end_ms=T0_MS + n) for n in (1, 2, 3)
    ]
    out = feed(sampler, first)  # decided on its first span; the other two follow, and count
    out += feed(sampler, [make(trace=two, span=1, end_ms=T0_MS + 10)])
    late = make(trace=two, span=2, parent=1, end_ms=T0_MS + 2_000)  # follows, in a later second
    out += sampler.add(late, "planner", 9)
    out += feed(sampler, [make(trace=three, span=1, end_ms=T0_MS + 1_000)])
    assert answers(out) == {1: {_P}, 2: {DROP_BUDGET}, 3: {_P}}
    assert sampler.stats.decided_at_once == 3
    assert sampler.stats.spans_over_budget == 2


def test_drop_now_leaves_budget_answers_to_add() -> None:
    """What a replay might answer otherwise must reach ``add``, which notes it in the budget."""
    sampler = TraceSampler(policy(keep_errors=False, budget_spans_per_second=1))
    kept, over = trace_id(1, LUCKY), trace_id(2, LUCKY)
    assert sampler.drop_now(make(trace=kept)) is False
    sampler.add(make(trace=kept), "a", 0)
    over_root = make(trace=over, span=1)
    assert sampler.drop_now(over_root) is False
    [item] = sampler.add(over_root, "a", 1)
    assert item.drop_reason == DROP_BUDGET
    assert sampler.drop_now(make(trace=over, span=2, parent=1)) is False  # to add, dropped
    assert sampler.drop_now(make(trace=trace_id(3, UNLUCKY))) is True  # chance alone: here


@pytest.mark.parametrize(
    ("budget", "kept_seconds"),
    [
        (0.5, [0, 2, 4]),  # one trace every two seconds: a slot holds at least one span
        (1, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_a_budget_under_one_span_a_second_lets_one_span_through_in_a_longer_slot(
    budget: float, kept_seconds: list[int]
) -> None:
    sampler = TraceSampler(policy(keep_errors=False, budget_spans_per_second=budget))
    out = feed(
        sampler,
        [make(trace=trace_id(n + 1, LUCKY), end_ms=T0_MS + 1_000 * n + 500) for n in range(6)],
    )
    assert [(item.end_ms - T0_MS) // 1_000 for item in out if item.keep] == kept_seconds


@settings(max_examples=80, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 5), st.booleans(), st.booleans()),
        max_size=40,
    ),
    budget=st.sampled_from([1, 2.5, 6]),
    at_once=st.booleans(),
)
def test_each_second_uses_its_budget_before_chance_drops_anything_and_overshoots_by_one_trace(
    plan: list[tuple[int, int, bool, bool]], budget: float, at_once: bool
) -> None:
    """Traces (second, spans, failed, lucky): kept or dropped whole; a trace that chance alone
    keeps is dropped only when its second has used its budget; a second goes past its budget
    by less than one trace, but for what rules keep."""
    traces = [
        budget_trace(
            n + 1, spans=size, at_ms=1_000 * second + 10 * n + 10, error=failed, lucky=lucky
        )
        for n, (second, size, failed, lucky) in enumerate(plan)
    ]
    sampler = TraceSampler(
        policy(probability=0.5, keep_errors=not at_once, budget_spans_per_second=budget)
    )
    out = decide_all(sampler, [span for trace in traces for span in trace])
    per_trace = answers(out)
    assert all(len(reasons) == 1 for reasons in per_trace.values())
    used: Counter[int] = Counter()  # second -> spans kept, and by rules
    by_rules: Counter[int] = Counter()
    for n, (second, size, _, _) in enumerate(plan):
        [reason] = per_trace[n + 1]
        if reason in ("error", _P):
            used[second] += size
        if reason == "error":
            by_rules[second] += size
        if reason == DROP_BUDGET:
            assert used[second] >= budget  # full before this trace came
    largest = max((size for _, size, _, _ in plan), default=0)
    for second, spans in used.items():
        assert spans - by_rules[second] < budget + largest


# --- what a forwarded span carries ---------------------------------------------------------------


def test_mark_forwarded_writes_reason_and_th_and_parses_back() -> None:
    sampler = TraceSampler(policy(probability=0.1))
    tracestate = "vendor=abc,ot=rv:ffffffffffffff;th:8;k1:13"
    span = make(tracestate=tracestate, attrs={"sampling.reason": "stale", "x": "y"})
    [item] = decide_all(sampler, [span])
    mark_forwarded(span.pb, item)
    assert span.pb.trace_state == f"ot=rv:ffffffffffffff;k1:13;th:{TH_10_PERCENT},vendor=abc"
    assert parse_tracestate(span.pb.trace_state) == OtelTraceState(
        threshold=th_to_threshold(TH_10_PERCENT), randomness=LUCKY
    )
    reasons = [kv.value.string_value for kv in span.pb.attributes if kv.key == "sampling.reason"]
    assert reasons == ["probabilistic"]
    assert SAMPLING_REASON_ATTRIBUTE == "sampling.reason"
    assert span.tracestate == tracestate  # the record keeps what arrived
    # idempotent, and the span still serialises and parses
    once = span.pb.SerializeToString()
    mark_forwarded(span.pb, item)
    assert span.pb.SerializeToString() == once
    assert Span.FromString(once).trace_state == span.pb.trace_state


def test_mark_forwarded_erases_an_inconsistent_upstream_th() -> None:
    sampler = TraceSampler(policy(probability=1.0))
    span = make(trace=trace_id(1, UNLUCKY), tracestate="ot=th:8;k1:13")
    [item] = decide_all(sampler, [span])
    mark_forwarded(span.pb, item)
    assert span.pb.trace_state == "ot=k1:13"


def test_mark_forwarded_refuses_a_dropped_span() -> None:
    sampler = TraceSampler(policy())
    span = make()
    [item] = decide_all(sampler, [span])
    with pytest.raises(ValueError, match="dropped"):
        mark_forwarded(span.pb, item)


def test_policy_must_be_a_sampling_policy() -> None:
    with pytest.raises(ValueError, match="SamplingPolicy"):
        TraceSampler({"probability": 0.1})  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(1, 12),  # trace
            st.integers(0, 5_000),  # end offset from T0, ms
            st.integers(0, 50),  # source offset
            st.booleans(),  # advance the watermark after this span
        ),
        max_size=80,
    ),
    max_traces=st.integers(1, 6),
)
def test_what_holds_windows_and_commits_back_is_the_minimum_over_buffered_traces(
    steps: list[tuple[int, int, int, bool]], max_traces: int
) -> None:
    """The earliest buffered end (keeps windows open) and the smallest buffered offset (holds
    the commit back) are what a scan of every buffered trace would say, at every step."""
    sampler = TraceSampler(policy(max_buffered_traces=max_traces, decision_max_wait_ms=2_000))
    for span_number, (trace, end, offset, advance) in enumerate(steps):
        sampler.add(
            make(trace=trace_id(trace), span=span_number + 1, end_ms=T0_MS + end), "a", offset
        )
        if advance:
            sampler.advance(T0_MS + end)
        buffered = sampler._traces.values()
        ends = [t.min_end_ns // 1_000_000 for t in buffered]
        offsets = [t.min_offset for t in buffered]
        assert sampler.earliest_buffered_end_ms() == (min(ends) if ends else None)
        assert sampler.pending_offset() == (min(offsets) if offsets else None)


# --- nothing to wait for: only the probability can keep a trace --------------------------------


def test_with_only_a_probability_a_trace_is_decided_on_its_first_span_as_waiting_would() -> None:
    spans = random_traces(random.Random(11), 400)
    rng = random.Random(12)
    shuffled = spans[:]
    rng.shuffle(shuffled)  # the spans of a trace interleave with other traces'
    at_once = TraceSampler(policy(keep_errors=False, probability=0.3))
    # The same probability, plus a rule that never holds: every trace waits for its decision.
    waiting = TraceSampler(policy(keep_errors=False, probability=0.3, latency_threshold_ms=10**9))
    out: list[SampledSpan] = []
    for offset, span in enumerate(shuffled):
        decided = at_once.add(span, "planner", offset)
        assert [ids(item) for item in decided] == [ids(span)]  # its answer, at once
        out += decided
        waiting.add(span, "planner", offset)
    assert at_once.stats.buffered_spans == at_once.stats.buffered_traces == 0
    assert at_once.earliest_buffered_end_ms() is None and at_once.pending_offset() is None
    waited = waiting.advance(FAR_FUTURE_MS)
    assert {ids(i): outcome(i) for i in out} == {ids(i): outcome(i) for i in waited}
    assert sum(item.keep for item in out) > 0 and not all(item.keep for item in out)
    stats = at_once.stats
    traces = len({span.trace_id for span in spans})
    assert stats.decided_at_once == stats.traces_decided == traces
    assert stats.spans_after_decision == 0  # its other spans were not late
    assert stats.spans_kept_total + stats.spans_dropped == len(spans)


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param({"keep_errors": True}, id="errors"),
        pytest.param({"latency_threshold_ms": 5_000}, id="latency"),
        pytest.param({"attribute_matches": {"user.id": frozenset({"x"})}}, id="attribute"),
    ],
)
def test_a_rule_that_a_later_span_can_meet_makes_every_trace_wait(rule: dict[str, Any]) -> None:
    sampler = TraceSampler(policy(**{"keep_errors": False, **rule}))
    assert sampler.add(make(trace=trace_id(1, UNLUCKY), span=2, parent=1), "a", 0) == []
    assert sampler.is_buffered(trace_id(1, UNLUCKY).to_bytes(16, "big"))


def test_drop_now_drops_what_add_would_drop_and_counts_it_once() -> None:
    sampler = TraceSampler(policy(keep_errors=False))
    dropped = [make(trace=trace_id(1, UNLUCKY), span=n) for n in (1, 2)]
    kept = make(trace=trace_id(2, LUCKY), span=1)
    assert [sampler.drop_now(span) for span in dropped] == [True, True]
    assert sampler.drop_now(kept) is False  # kept: the caller hands it to add
    [item] = sampler.add(kept, "a", 0)
    assert (ids(item), item.keep, item.reason) == (ids(kept), True, "probabilistic")
    stats = sampler.stats
    assert (stats.traces_decided, stats.decided_at_once, stats.traces_kept) == (2, 2, 1)
    assert (stats.spans_dropped, stats.spans_kept_total, stats.spans_after_decision) == (2, 1, 0)


def test_drop_now_leaves_undecided_traces_to_add_and_drops_late_spans_of_dropped_ones() -> None:
    sampler = TraceSampler(policy())  # errors keep a trace: every trace waits
    root = make(trace=trace_id(1, UNLUCKY), span=1)
    assert sampler.drop_now(root) is False
    assert sampler.add(root, "a", 0) == []  # buffered, undecided
    [decided] = sampler.advance(FAR_FUTURE_MS)
    assert decided.keep is False
    late = make(trace=trace_id(1, UNLUCKY), span=2, parent=1, error=True)
    assert sampler.drop_now(late) is True  # follows its trace's decision
    assert (sampler.stats.spans_after_decision, sampler.stats.spans_dropped) == (1, 2)
    error = make(trace=trace_id(2, UNLUCKY), span=1, error=True)
    assert sampler.drop_now(error) is False
    [kept] = sampler.add(error, "a", 1)  # kept on its error
    assert (kept.keep, kept.reason) == (True, "error")
    assert sampler.drop_now(make(trace=trace_id(2, UNLUCKY), span=2, parent=1)) is False
