"""Spans sampled upstream (a ``th`` in their tracestate) count with their adjusted count.

Rule 1 of the design: counts stay right whatever the sampling. When an agent's own SDK or a
Collector already kept only 10% of the traces, a window must still report about the spans the
agent really produced, and say that its numbers are estimates.
"""

from __future__ import annotations

import math
import random

import orjson
import pytest
from spanbuilder import T0_MS, payload_of, request_of, span_pb

from processor.core.aggregate import WindowAggregate
from processor.core.decoding import decode_request, extract_spans
from processor.core.partition import PartitionAggregator
from processor.core.rollup import ALL_SERIES, PartialRollup, SeriesKey, parse_stage_record
from processor.core.sampling.threshold import (
    MAX_ADJUSTED_COUNT,
    adjusted_count,
    extra_weight,
    probability_to_threshold,
    th_to_threshold,
    threshold_to_th,
    trace_id_randomness,
)
from processor.core.semconv import ExtractionConfig
from processor.core.sketch import WEIGHT_ONE, LatencySketch
from processor.core.spans import SpanRecord

LLM = {"openinference.span.kind": "LLM", "agent.name": "coder"}


@pytest.mark.parametrize(
    ("th", "expected"),
    [("0", 0), ("8", WEIGHT_ONE), ("c", 3 * WEIGHT_ONE), ("f", 15 * WEIGHT_ONE)],
)
def test_extra_weight_is_the_adjusted_count_minus_one(th: str, expected: int) -> None:
    threshold = th_to_threshold(th)
    assert threshold is not None
    assert extra_weight(threshold, WEIGHT_ONE) == expected


def test_extra_weight_of_a_10_percent_threshold_rounds_the_exact_adjusted_count() -> None:
    threshold = probability_to_threshold(0.1, precision=4)  # th:e666, as SDKs write it
    weight = extra_weight(threshold, WEIGHT_ONE)
    assert abs(weight - (adjusted_count(threshold) - 1) * WEIGHT_ONE) <= 0.5
    assert 8_999_000 < weight < 9_000_000  # 9.99939...: e666 keeps a little over 10%


def extract_one(tracestate: str, attrs: dict[str, object] | None = None) -> SpanRecord:
    span = span_pb(attrs=attrs or LLM)
    span.trace_state = tracestate
    decoded = extract_spans(request_of([span]), ExtractionConfig())
    assert decoded.rejected == []
    [record] = decoded.spans
    return record


@pytest.mark.parametrize(
    ("tracestate", "weight"),
    [
        ("", 0),
        ("vendor=1", 0),
        ("ot=th:0", 0),  # kept with certainty: stands for itself
        ("ot=th:8", WEIGHT_ONE),
        ("vendor=1,ot=rv:0123456789abcd;th:c", 3 * WEIGHT_ONE),
        ("ot=th:xyz", 0),  # an invalid th reads as absent, as the specification says
    ],
)
def test_the_decoder_reads_the_upstream_adjusted_count(tracestate: str, weight: int) -> None:
    assert extract_one(tracestate).extra_weight == weight


def test_a_probability_below_the_limit_is_dead_lettered_with_its_reason() -> None:
    lowest = threshold_to_th(MAX_ADJUSTED_COUNT - MAX_ADJUSTED_COUNT // (1 << 14))
    assert extract_one(f"ot=th:{lowest}").extra_weight == ((1 << 14) - 1) * WEIGHT_ONE

    span = span_pb(attrs=LLM)
    span.trace_state = "ot=th:ffffff"
    decoded = extract_spans(request_of([span]), ExtractionConfig())
    assert decoded.spans == []
    [rejected] = decoded.rejected
    assert rejected.reason == "absurd_value"
    assert "1/16384" in rejected.detail


def test_counts_tokens_and_cost_scale_by_the_adjusted_count_and_say_so() -> None:
    aggregate = WindowAggregate()
    for i in range(4):  # kept at 50% upstream: each stands for 2
        aggregate.add(
            trace_id=bytes([i + 1]) * 16,
            duration_ns=(i + 1) * 1_000_000,
            is_error=i == 0,
            is_invocation=True,
            is_llm=True,
            tokens_prompt=100,
            tokens_completion=7,
            tokens_total=107,
            cost_nanos=3,
            extra_weight=WEIGHT_ONE,
        )
    aggregate.add(  # one span not sampled upstream
        trace_id=b"\x09" * 16,
        duration_ns=1_000_000,
        is_error=False,
        is_invocation=False,
        is_llm=False,
        tokens_prompt=0,
        tokens_completion=0,
        tokens_total=0,
        cost_nanos=0,
    )
    metrics = aggregate.metrics()
    assert metrics["spans"] == 9
    assert metrics["errors"] == 2
    assert metrics["error_rate"] == 2 / 9
    assert metrics["invocations"] == 8
    assert metrics["llm_calls"] == 8
    assert (metrics["tokens_prompt"], metrics["tokens_completion"]) == (800, 56)
    assert metrics["tokens_total"] == 856
    assert metrics["cost_usd"] == 24 / 1e9
    assert metrics["upstream_sampled_spans"] == 4
    assert metrics["counts_adjusted"] == 1
    # bookkeeping stays in spans received
    assert aggregate.spans == 5


def test_without_upstream_sampling_the_counts_are_plain_and_the_state_unchanged() -> None:
    aggregate = WindowAggregate()
    aggregate.add(
        trace_id=b"\x01" * 16,
        duration_ns=5,
        is_error=True,
        is_invocation=True,
        is_llm=True,
        tokens_prompt=1,
        tokens_completion=2,
        tokens_total=3,
        cost_nanos=4,
    )
    metrics = aggregate.metrics()
    assert (metrics["upstream_sampled_spans"], metrics["counts_adjusted"]) == (0, 0)
    assert isinstance(metrics["spans"], int)
    assert "upstream" not in aggregate.to_state()


def test_percentiles_weigh_each_invocation_by_its_adjusted_count() -> None:
    sketch = LatencySketch()
    sketch.add(10.0)  # one invocation kept with certainty
    sketch.add(1000.0, extra_weight=9 * WEIGHT_ONE)  # one kept at 10%: stands for ten
    median = sketch.quantile(0.5)
    assert median == pytest.approx(1000.0, rel=0.01)
    unweighted = LatencySketch()
    unweighted.add(10.0)
    unweighted.add(1000.0)
    assert unweighted.quantile(0.5) == pytest.approx(10.0, rel=0.01)


def test_weighted_partials_survive_the_topic_and_merge_in_any_order() -> None:
    rng = random.Random(7)
    parts = []
    for p in range(4):
        aggregate = WindowAggregate()
        for _ in range(50):
            aggregate.add(
                trace_id=rng.randbytes(16),
                duration_ns=rng.randint(0, 10**10),
                is_error=rng.random() < 0.2,
                is_invocation=rng.random() < 0.5,
                is_llm=rng.random() < 0.5,
                tokens_prompt=rng.randint(0, 10**5),
                tokens_completion=rng.randint(0, 10**4),
                tokens_total=rng.randint(0, 10**5),
                cost_nanos=rng.randint(0, 10**7),
                extra_weight=rng.choice([0, WEIGHT_ONE, 9_000_153]),
            )
        partial = PartialRollup(SeriesKey("coder"), 0, 60_000, p, aggregate)
        parsed = parse_stage_record(partial.to_bytes())
        assert isinstance(parsed, PartialRollup)
        assert parsed.to_bytes() == partial.to_bytes()
        parts.append(parsed.aggregate)

    forward, backward = WindowAggregate(), WindowAggregate()
    for part in parts:
        forward.merge(WindowAggregate.from_state(orjson.loads(orjson.dumps(part.to_state()))))
    for part in reversed(parts):
        backward.merge(part)
    assert forward.to_state() == backward.to_state()
    assert forward.metrics() == backward.metrics()


def test_a_window_of_10_percent_upstream_traces_estimates_the_whole_population() -> None:
    """Agents produce 20,000 traces; an upstream sampler keeps 10% by trace id and marks them
    th:e666. The window's estimates land near the population's true numbers."""
    rng = random.Random(20261126)
    threshold = probability_to_threshold(0.1, precision=4)
    th = threshold_to_th(threshold)
    truth = {"spans": 0, "errors": 0, "tokens_total": 0}
    agg = PartitionAggregator(
        0, window_size_ms=60_000, allowed_lateness_ms=1_000, idle_timeout_ms=5_000
    )
    config = ExtractionConfig()
    offset = 0
    for n in range(20_000):
        trace = rng.getrandbits(128).to_bytes(16, "big")
        failed = rng.random() < 0.05
        tokens = rng.randint(50, 500)
        spans = [
            span_pb(trace=trace, span=1, start_ms=T0_MS + n, attrs={"agent.name": "coder"}),
            span_pb(
                trace=trace,
                span=2,
                parent=1,
                start_ms=T0_MS + n,
                attrs={**LLM, "llm.token_count.total": tokens},
                error=failed,
            ),
        ]
        truth["spans"] += 2
        truth["errors"] += failed
        truth["tokens_total"] += tokens
        if trace_id_randomness(trace) < threshold:
            continue  # dropped upstream: the processor never sees it
        for span in spans:
            span.trace_state = f"ot=th:{th}"
        decoded = extract_spans(decode_request(payload_of(spans)), config)
        agg.add(offset, decoded.spans, now_ms=0)
        offset += 1
    # The agent's partial, and the all-agents one with the same numbers.
    partial, every = agg.advance(T0_MS + 10**9, caught_up=True).partials
    assert every.series == ALL_SERIES and every.aggregate.to_state() == partial.aggregate.to_state()
    metrics = partial.aggregate.metrics()

    kept_traces = metrics["upstream_sampled_spans"] / 2
    assert metrics["counts_adjusted"] == 1
    assert abs(kept_traces - 2_000) <= 4 * math.sqrt(20_000 * 0.1 * 0.9)
    # Unbiased estimates: the kept count's relative standard error is about 2.1%, so within
    # five of them of the truth (the received counts alone would be off tenfold).
    assert metrics["spans"] == pytest.approx(truth["spans"], rel=0.11)
    assert metrics["tokens_total"] == pytest.approx(truth["tokens_total"], rel=0.11)
    assert metrics["error_rate"] == pytest.approx(truth["errors"] / truth["spans"], abs=0.02)
    assert metrics["invocations"] == metrics["spans"] / 2
