"""Kept spans written from their message's bytes read exactly as the OTLP classes' marked spans.

``kept_spans_of`` takes a protobuf span's bytes from its message and appends the sampling marks;
these tests parse its records and compare them with what ``mark_forwarded`` makes of the same
spans parsed by the OTLP classes: the same fields, unknown ones included, the same origins.
"""

from __future__ import annotations

import itertools

import pytest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from processor.core.decoding import decode_request, decode_spans
from processor.core.otlp_wire import WireError, index_request
from processor.core.sampling import SampledSpan, mark_forwarded
from processor.core.semconv import ExtractionConfig
from processor.worker.kept_spans import kept_span_records, kept_spans_of, spans_of_record
from tests.unit.core.spanbuilder import otlp_json, request, resource_spans, span_pb

CONFIG = ExtractionConfig()
_UNKNOWN_VARINT = b"\xa0\x06\x2a"  # field 100, varint 42: a field newer than our schema
# field 101 as a group, which no OTLP message uses: the bytes are then read by the OTLP classes
_UNKNOWN_GROUP = b"\xab\x06\x08\x01\xac\x06"


def _with_unknown(span: Span) -> Span:
    return Span.FromString(span.SerializeToString() + _UNKNOWN_VARINT)


def _payload(extra: bytes = _UNKNOWN_VARINT) -> bytes:
    first = resource_spans(
        [
            span_pb(trace=1, span=1, attrs={"agent.name": "planner"}),
            _with_unknown(span_pb(trace=1, span=2, parent=1, error=True)),
        ],
        {"service.name": "shop", "openinference.project.name": "shop-agents"},
        scope="langchain",
    )
    second_scope = ScopeSpans(spans=[span_pb(trace=2, span=1, attrs={"input.value": "é" * 300})])
    second_scope.spans[0].trace_state = "ot=rv:ffffffffffffff;th:8,vendor=x"
    first.scope_spans.append(second_scope)
    other = resource_spans(
        [
            span_pb(trace=1, span=3, parent=2, attrs={"sampling.reason": "upstream"}),
            span_pb(trace=2, span=2, parent=1),
        ],
        {"service.name": "search"},
        scope="openai",
    )
    resource = ResourceSpans.FromString(other.SerializeToString() + extra)
    return request(first, resource).SerializeToString()


def _kept(payload: bytes, content_type: str | None = None) -> list[SampledSpan]:
    decoded = decode_spans(payload, content_type, CONFIG)
    reasons = itertools.cycle([("error", 0), ("probabilistic", 1 << 54), ("latency", None)])
    items = []
    for offset, record in enumerate(decoded.spans):
        item = SampledSpan.of(record, "agent", offset, False)
        item.keep = True
        item.reason, item.threshold = next(reasons)
        items.append(item)
    return items


def _expected(
    payload: bytes, items: list[SampledSpan]
) -> dict[bytes, tuple[bytes, bytes, bytes, str, str]]:
    """Per span id: the marked span as the OTLP classes write it, and its origin's fields."""
    spans = [
        (resource, scope, span)
        for resource in decode_request(payload).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    expected = {}
    for item in items:
        resource, scope, span = spans[item.position]
        marked = Span()
        marked.CopyFrom(span)
        mark_forwarded(marked, item)
        expected[span.span_id] = _canonical(
            marked, resource.resource, scope.scope, resource.schema_url, scope.schema_url
        )
    return expected


def _canonical(
    span: Span, resource: Resource, scope: InstrumentationScope, resource_url: str, scope_url: str
) -> tuple[bytes, bytes, bytes, str, str]:
    return (
        span.SerializeToString(deterministic=True),
        resource.SerializeToString(deterministic=True),
        scope.SerializeToString(deterministic=True),
        resource_url,
        scope_url,
    )


def _written(items: list[SampledSpan]) -> dict[bytes, tuple[bytes, bytes, bytes, str, str]]:
    written = {}
    for key, value in kept_span_records(kept_spans_of(items)):
        for origin, span in spans_of_record(value):
            assert span.trace_id == key, "a record holds one trace"
            written[span.span_id] = _canonical(
                span,
                origin.resource,
                origin.scope,
                origin.resource_schema_url,
                origin.scope_schema_url,
            )
    return written


def test_spans_from_the_message_bytes_read_as_the_marked_otlp_spans() -> None:
    payload = _payload()
    items = _kept(payload)
    assert len(items) == 5
    written = _written(items)
    assert written == _expected(payload, items)
    reasons = [
        [
            kv.value.string_value
            for kv in Span.FromString(fields[0]).attributes
            if kv.key == "sampling.reason"
        ]
        for fields in written.values()
    ]
    assert all(len(found) == 1 for found in reasons), "one sampling.reason per span"


def test_a_json_message_and_a_message_with_groups_are_marked_alike() -> None:
    with_group = _payload(_UNKNOWN_GROUP)
    with pytest.raises(WireError):
        index_request(with_group)
    for payload, content_type in [
        (with_group, None),
        (otlp_json(decode_request(_payload())), "application/json"),
    ]:
        items = _kept(payload, content_type)
        assert _written(items) == _expected(payload if content_type is None else _payload(), items)


def test_without_a_reason_a_span_passes_unchanged() -> None:
    payload = _payload()
    items = _kept(payload)
    for item in items:
        item.reason, item.threshold = None, None  # forwarding without a sampler
    [record] = [value for key, value in kept_span_records(kept_spans_of(items[:1]))]
    [(_, span)] = spans_of_record(record)
    original = decode_request(payload).resource_spans[0].scope_spans[0].spans[0]
    assert span.SerializeToString(deterministic=True) == original.SerializeToString(
        deterministic=True
    )
