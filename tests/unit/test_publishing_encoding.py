"""Spans to Kafka messages: one OTLP request per trace, keyed so a trace stays on one partition.

What a user relies on: every span the SDK hands over reaches exactly one message, the message
decodes in the worker with the same spans, the key is the trace id the loadgen and the
Collector use, and no message exceeds the size Kafka accepts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processor.core.decoding import decode_request, extract_spans
from processor.core.semconv import ExtractionConfig
from processor.publishing.encoding import CONTENT_TYPE, encode_batch, trace_key


def finished_spans(
    traces: int, spans_per_trace: int, *, value_bytes: int = 10
) -> list[ReadableSpan]:
    """Real SDK spans: ``traces`` traces, interleaved as a batch processor would see them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "agent-x"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    roots = [tracer.start_span(f"root-{t}") for t in range(traces)]
    for index in range(spans_per_trace - 1):
        for t, root in enumerate(roots):
            with tracer.start_as_current_span(
                f"child-{t}-{index}", context=trace.set_span_in_context(root)
            ) as child:
                child.set_attribute("input.value", "x" * value_bytes)
    for root in roots:
        root.end()
    provider.shutdown()
    return list(exporter.get_finished_spans())


def decoded_span_ids(value: bytes) -> Iterator[int]:
    request = decode_request(value, CONTENT_TYPE.decode())
    decoded = extract_spans(request, ExtractionConfig())
    assert not decoded.rejected
    for record in decoded.spans:
        yield int.from_bytes(record.span_id, "big")


def test_one_message_per_trace_keyed_by_lowercase_hex_trace_id() -> None:
    spans = finished_spans(traces=3, spans_per_trace=4)
    batch = encode_batch(spans, max_message_bytes=1_000_000)

    assert len(batch.messages) == 3
    assert batch.oversized_spans == 0
    trace_ids = {span.context.trace_id for span in spans}
    assert {message.key for message in batch.messages} == {
        f"{trace_id:032x}".encode("ascii") for trace_id in trace_ids
    }
    for message in batch.messages:
        request = ExportTraceServiceRequest.FromString(message.value)
        in_message = {
            span.trace_id.hex()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        assert in_message == {message.key.decode("ascii")}
        assert message.span_count == 4


def test_every_span_decodes_in_the_worker_exactly_once() -> None:
    spans = finished_spans(traces=5, spans_per_trace=3)
    batch = encode_batch(spans, max_message_bytes=1_000_000)

    decoded = [span_id for message in batch.messages for span_id in decoded_span_ids(message.value)]
    assert sorted(decoded) == sorted(span.context.span_id for span in spans)
    assert batch.span_count == len(spans)


def test_a_trace_over_the_size_limit_is_split_under_the_limit_with_the_same_key() -> None:
    spans = finished_spans(traces=1, spans_per_trace=40, value_bytes=1_000)
    whole = encode_batch(spans, max_message_bytes=10_000_000).messages[0]
    limit = len(whole.value) // 5

    batch = encode_batch(spans, max_message_bytes=limit)

    assert len(batch.messages) > 5
    assert all(len(message.value) <= limit for message in batch.messages)
    assert {message.key for message in batch.messages} == {whole.key}
    decoded = [span_id for message in batch.messages for span_id in decoded_span_ids(message.value)]
    assert sorted(decoded) == sorted(span.context.span_id for span in spans)


def test_a_span_larger_than_the_limit_alone_is_counted_not_sent() -> None:
    big = finished_spans(traces=1, spans_per_trace=2, value_bytes=50_000)
    small = finished_spans(traces=1, spans_per_trace=2)

    batch = encode_batch(big + small, max_message_bytes=20_000)

    assert batch.oversized_spans == 1  # the child with 50 kB; its root fits
    assert batch.span_count == 3
    assert all(len(message.value) <= 20_000 for message in batch.messages)


def test_trace_key_is_32_hex_digits_even_for_small_ids() -> None:
    assert trace_key(1) == b"00000000000000000000000000000001"
    assert trace_key(0xABC << 100) == f"{0xABC << 100:032x}".encode()


def test_empty_batch_makes_no_messages() -> None:
    assert encode_batch([], max_message_bytes=100).messages == []


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        encode_batch([], max_message_bytes=0)
