"""Window aggregates: exact counts and sums, 1% percentiles, and merges that do not care how
partials are grouped or ordered — what lets many partitions and workers agree on one number."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core.aggregate import MAX_EXEMPLARS, WindowAggregate
from processor.core.rollup import PartialRollup, SeriesKey, parse_stage_record
from processor.core.sketch import RELATIVE_ACCURACY

SpanFacts = dict[str, Any]

span_facts = st.fixed_dictionaries(
    {
        "trace_id": st.integers(1, 12).map(lambda n: n.to_bytes(16, "big")),
        # integer nanoseconds, from zero to hours, with many ties
        "duration_ns": st.one_of(
            st.integers(0, 10**13), st.sampled_from([0, 1, 1_000_000, 5_000_000])
        ),
        "is_error": st.booleans(),
        "is_invocation": st.booleans(),
        "is_llm": st.booleans(),
        "tokens_prompt": st.integers(0, 10**6),
        "tokens_completion": st.integers(0, 10**6),
        "tokens_total": st.integers(0, 2 * 10**6),
        "cost_nanos": st.integers(0, 10**9),
    }
)


def aggregate_of(spans: list[SpanFacts]) -> WindowAggregate:
    aggregate = WindowAggregate()
    for facts in spans:
        aggregate.add(**facts)
    return aggregate


@settings(max_examples=100, deadline=None)
@given(
    spans=st.lists(span_facts, max_size=60),
    groups=st.integers(1, 6),
    rng=st.randoms(use_true_random=False),
)
def test_merging_partials_in_any_grouping_and_order_equals_aggregating_at_once(
    spans: list[SpanFacts], groups: int, rng: random.Random
) -> None:
    whole = aggregate_of(spans)

    buckets: list[list[SpanFacts]] = [[] for _ in range(groups)]
    for facts in spans:
        buckets[rng.randrange(groups)].append(facts)
    partials = [aggregate_of(bucket) for bucket in buckets]
    # merge random pairs until one is left: every grouping and order is possible
    while len(partials) > 1:
        into = partials.pop(rng.randrange(len(partials)))
        other = partials.pop(rng.randrange(len(partials)))
        into.merge(other)
        partials.append(into)

    assert partials[0].to_state() == whole.to_state()


@settings(max_examples=100, deadline=None)
@given(st.lists(span_facts, max_size=80))
def test_counts_and_sums_are_exact(spans: list[SpanFacts]) -> None:
    aggregate = aggregate_of(spans)
    llm = [s for s in spans if s["is_llm"]]
    invocations = [s for s in spans if s["is_invocation"]]
    metrics = aggregate.metrics()

    assert metrics["spans"] == len(spans)
    assert metrics["errors"] == sum(s["is_error"] for s in spans)
    assert metrics["error_rate"] == (metrics["errors"] / len(spans) if spans else 0.0)
    assert metrics["invocations"] == len(invocations)
    assert metrics["llm_calls"] == len(llm)
    assert metrics["tokens_prompt"] == sum(s["tokens_prompt"] for s in llm)
    assert metrics["tokens_completion"] == sum(s["tokens_completion"] for s in llm)
    assert metrics["tokens_total"] == sum(s["tokens_total"] for s in llm)
    assert aggregate.cost_nanos == sum(s["cost_nanos"] for s in llm)
    assert metrics["cost_usd"] == pytest.approx(sum(s["cost_nanos"] for s in llm) / 1e9)
    if invocations:
        slowest = max(s["duration_ns"] for s in invocations)
        assert metrics["latency_max_ms"] == slowest / 1e6
    else:
        # no invocation, no latency: absent rather than a misleading zero
        assert not any(name.startswith("latency_") for name in metrics)


def heavy_tailed_ns(name: str, rng: random.Random) -> int:
    if name == "lognormal":
        return round(rng.lognormvariate(math.log(2e8), 2.5))  # median 200 ms
    if name == "pareto":
        return round(rng.paretovariate(1.2) * 1e6)
    if name == "sub-millisecond":
        return rng.randint(1, 999_999)
    return rng.randint(0, 10**10)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["lognormal", "pareto", "sub-millisecond", "uniform"]),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 2_000),
    parts=st.integers(1, 8),
)
def test_latency_percentiles_are_within_one_percent_after_merging(
    name: str, seed: int, n: int, parts: int
) -> None:
    rng = random.Random(seed)
    durations = [heavy_tailed_ns(name, rng) for _ in range(n)]
    partials = [WindowAggregate() for _ in range(parts)]
    for duration in durations:
        rng.choice(partials).add(
            trace_id=b"\x01" * 16,
            duration_ns=duration,
            is_error=False,
            is_invocation=True,
            is_llm=False,
            tokens_prompt=0,
            tokens_completion=0,
            tokens_total=0,
            cost_nanos=0,
        )
    merged = WindowAggregate()
    for partial in partials:
        merged.merge(partial)
    metrics = merged.metrics()

    values_ms = sorted(d / 1e6 for d in durations)
    for metric, q in (("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99)):
        exact = values_ms[math.floor(q * (n - 1))]
        assert metrics[metric] == pytest.approx(exact, rel=RELATIVE_ACCURACY * (1 + 1e-9)), metric
    assert metrics["latency_max_ms"] == values_ms[-1]


@settings(max_examples=100, deadline=None)
@given(st.lists(span_facts, max_size=40), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_state_round_trips_through_json(
    spans: list[SpanFacts], late: int, sampled: int, dropped: int
) -> None:
    aggregate = aggregate_of(spans)
    aggregate.late_spans, aggregate.sampled_spans, aggregate.dropped_spans = late, sampled, dropped
    restored = WindowAggregate.from_state(orjson.loads(orjson.dumps(aggregate.to_state())))
    assert restored.to_state() == aggregate.to_state()
    assert restored.metrics() == aggregate.metrics()
    assert restored == aggregate


@settings(max_examples=100, deadline=None)
@given(st.lists(span_facts, max_size=40), st.randoms(use_true_random=False))
def test_a_partial_from_the_same_spans_is_the_same_bytes_in_any_order(
    spans: list[SpanFacts], rng: random.Random
) -> None:
    shuffled = list(spans)
    rng.shuffle(shuffled)
    series = SeriesKey("planner", ("prod",))
    first = PartialRollup(series, 1_700_000_040_000, 60_000, 3, aggregate_of(spans))
    second = PartialRollup(series, 1_700_000_040_000, 60_000, 3, aggregate_of(shuffled))

    assert first.to_bytes() == second.to_bytes()
    assert first.key() == second.key()
    parsed = parse_stage_record(first.to_bytes())
    assert isinstance(parsed, PartialRollup)
    assert parsed.to_bytes() == first.to_bytes()


def test_bookkeeping_counts_merge_by_adding() -> None:
    a, b = (
        WindowAggregate(late_spans=2, sampled_spans=3),
        WindowAggregate(late_spans=1, dropped_spans=4),
    )
    a.merge(b)
    assert (a.late_spans, a.sampled_spans, a.dropped_spans) == (3, 3, 4)
    assert {k: a.metrics()[k] for k in ("late_spans", "sampled_spans", "dropped_spans")} == {
        "late_spans": 3,
        "sampled_spans": 3,
        "dropped_spans": 4,
    }


# --- exemplars: the traces a rollup links to -------------------------------------------------


def trace(n: int) -> bytes:
    return n.to_bytes(16, "big")


def add(aggregate: WindowAggregate, n: int, duration_ns: int, *, error: bool = False) -> None:
    aggregate.add(
        trace_id=trace(n),
        duration_ns=duration_ns,
        is_error=error,
        is_invocation=True,
        is_llm=False,
        tokens_prompt=0,
        tokens_completion=0,
        tokens_total=0,
        cost_nanos=0,
    )


def test_exemplars_are_the_slowest_invocations_and_some_failed_traces() -> None:
    aggregate = WindowAggregate()
    for n, duration in [(1, 50), (2, 900), (3, 10), (4, 700), (5, 900), (6, 800)]:
        add(aggregate, n, duration, error=n % 2 == 0)

    assert len(aggregate.slowest) == MAX_EXEMPLARS
    # slowest first; equal durations ordered by trace id, so every merge order agrees
    assert aggregate.slowest == [
        (900, trace(2).hex()),
        (900, trace(5).hex()),
        (800, trace(6).hex()),
    ]
    assert aggregate.failed == [trace(2).hex(), trace(4).hex(), trace(6).hex()]


@settings(max_examples=100, deadline=None)
@given(st.lists(span_facts, max_size=40), st.randoms(use_true_random=False))
def test_exemplars_do_not_depend_on_how_spans_were_split(
    spans: list[SpanFacts], rng: random.Random
) -> None:
    whole = aggregate_of(spans)
    left, right = [], []
    for facts in spans:
        (left if rng.random() < 0.5 else right).append(facts)
    merged = aggregate_of(right)
    merged.merge(aggregate_of(left))

    assert (merged.slowest, merged.failed) == (whole.slowest, whole.failed)
    expected_slowest = sorted(
        {(s["duration_ns"], s["trace_id"].hex()) for s in spans if s["is_invocation"]},
        key=lambda item: (-item[0], item[1]),
    )[:MAX_EXEMPLARS]
    assert whole.slowest == expected_slowest
    assert (
        whole.failed
        == sorted({s["trace_id"].hex() for s in spans if s["is_error"]})[:MAX_EXEMPLARS]
    )
