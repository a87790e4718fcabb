"""Spans delivered twice by the load generator, and the truth that counts them once."""

from __future__ import annotations

from collections import Counter

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import Delivery, Redelivery, Scenario, TraceGenerator, Truth, TruthBuilder

T0_MS = 1_700_000_000_000


def traces(count: int, seed: int = 3) -> list:
    return list(TraceGenerator(Scenario(agents=4, seed=seed), start_ms=T0_MS).generate(count))


def published(deliveries: list[Delivery]) -> Counter[tuple[bytes, bytes]]:
    """How often each (trace id, span id) is on the topic."""
    seen: Counter[tuple[bytes, bytes]] = Counter()
    for delivery in deliveries:
        request = ExportTraceServiceRequest.FromString(delivery.payload)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    seen[(span.trace_id, span.span_id)] += 1
    return seen


def deliver_all(fraction: float, generated: list, seed: int = 7) -> list[Delivery]:
    redelivery = Redelivery(fraction=fraction, seed=seed)
    deliveries = [d for trace in generated for d in redelivery.deliveries(trace)]
    return deliveries + redelivery.drain()


def test_every_span_goes_out_and_the_copies_are_what_the_deliveries_say() -> None:
    generated = traces(60)
    deliveries = deliver_all(0.5, generated)
    seen = published(deliveries)

    every_span = {(t.trace_id, s) for t in generated for s in t.span_ids}
    assert set(seen) == every_span
    said = Counter()
    for delivery in deliveries:
        for span_id, extra in delivery.copies.items():
            said[(delivery.trace.trace_id, span_id)] += extra
    assert {key: n - 1 for key, n in seen.items() if n > 1} == dict(said)
    # one first delivery per trace, before any copy of its spans
    firsts = [d.trace.index for d in deliveries if d.first]
    assert sorted(firsts) == [t.index for t in generated]
    first_at = {d.trace.index: i for i, d in enumerate(deliveries) if d.first}
    for position, delivery in enumerate(deliveries):
        if not delivery.first:
            assert first_at[delivery.trace.index] < position
    assert sum(delivery.span_count for delivery in deliveries) == sum(seen.values())


def test_the_three_kinds_of_copies_appear() -> None:
    deliveries = deliver_all(1.0, traces(40))
    whole = [d for d in deliveries if not d.first and d.span_count == d.trace.span_count]
    alone = [d for d in deliveries if not d.first and d.span_count < d.trace.span_count]
    inside = [d for d in deliveries if d.first and d.copies]
    assert whole and alone and inside


def test_without_a_fraction_each_trace_is_one_message_as_generated() -> None:
    generated = traces(10)
    deliveries = deliver_all(0.0, generated)
    assert [(d.payload, d.copies) for d in deliveries] == [(t.payload, {}) for t in generated]


def test_the_truth_counts_each_span_once_and_every_copy_in_duplicate_spans() -> None:
    generated = traces(50)
    deliveries = deliver_all(0.6, generated)
    builder = TruthBuilder(window_size_ms=10_000)
    for delivery in deliveries:
        if delivery.first:
            builder.add(delivery.trace)
        builder.add_copies(delivery.trace, delivery.copies)
    truth = builder.build()
    plain = Truth.from_traces(generated, window_size_ms=10_000)

    def without_copies(rollups: list) -> list:
        return [{k: v for k, v in r.items() if k != "duplicate_spans"} for r in rollups]

    assert without_copies(truth.rollups) == without_copies(plain.rollups)
    copies = sum(n - 1 for n in published(deliveries).values())
    assert copies > 0
    assert sum(r["duplicate_spans"] for r in truth.rollups if r["agent"] != ALL_AGENTS) == copies


def test_a_fraction_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Redelivery(fraction=1.5, seed=1)
