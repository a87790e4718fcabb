"""Concise builders for OTLP spans, export requests and span records, for the core's tests.

Ids are small integers turned into big-endian bytes (``tid(1)``, ``sid(2)``), times are integer
milliseconds from ``T0_MS`` (a 60 s window boundary) unless nanoseconds are given.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from processor.core.spans import NANOS_PER_MILLI, MessageSource, SpanOrigin, SpanRecord

T0_MS = 1_700_000_040_000
assert T0_MS % 60_000 == 0

Scalar = str | bool | int | float | bytes


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def any_value(value: Scalar | Sequence[Scalar]) -> AnyValue:
    # bool before int: True is an int in Python
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))


def attributes(values: Mapping[str, Any] | None) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in (values or {}).items()]


def span_pb(
    *,
    trace: int | bytes = 1,
    span: int | bytes = 1,
    parent: int | bytes | None = None,
    start_ms: int = T0_MS,
    duration_ms: int = 100,
    start_ns: int | None = None,
    end_ns: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    error: bool = False,
    name: str = "span",
) -> Span:
    """One span; ``start_ns``/``end_ns`` override the millisecond arguments."""
    start = start_ns if start_ns is not None else start_ms * NANOS_PER_MILLI
    end = end_ns if end_ns is not None else start + duration_ms * NANOS_PER_MILLI
    return Span(
        trace_id=tid(trace) if isinstance(trace, int) else trace,
        span_id=sid(span) if isinstance(span, int) else span,
        parent_span_id=b""
        if parent is None
        else sid(parent)
        if isinstance(parent, int)
        else parent,
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=attributes(attrs),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
    )


def resource_spans(
    spans: Iterable[Span],
    resource: Mapping[str, Any] | None = None,
    scope: str = "test.scope",
) -> ResourceSpans:
    return ResourceSpans(
        resource=Resource(attributes=attributes(resource)),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope), spans=list(spans))],
        schema_url="https://opentelemetry.io/schemas/1.26.0",
    )


def request(*groups: ResourceSpans) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=list(groups))


def request_of(
    spans: Iterable[Span], resource: Mapping[str, Any] | None = None
) -> ExportTraceServiceRequest:
    """A request with one resource and one scope holding ``spans``."""
    return request(resource_spans(spans, resource))


def payload_of(spans: Iterable[Span], resource: Mapping[str, Any] | None = None) -> bytes:
    return request_of(spans, resource).SerializeToString()


def otlp_json(message: ExportTraceServiceRequest) -> bytes:
    """The OTLP/JSON encoding: lowerCamelCase names, hex ids, enums as integers, 64-bit
    integers as strings (protobuf's JSON mapping does the rest)."""
    document = json_format.MessageToDict(message, use_integers_for_enums=True)
    for group in document.get("resourceSpans", []):
        for scope in group.get("scopeSpans", []):
            for span in scope.get("spans", []):
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return orjson.dumps(document)


_ORIGINS: dict[str | None, SpanOrigin] = {}


def origin(service: str | None) -> SpanOrigin:
    found = _ORIGINS.get(service)
    if found is None:
        resource = Resource(attributes=attributes({"service.name": service} if service else {}))
        found = _ORIGINS[service] = SpanOrigin(
            resource=resource,
            scope=InstrumentationScope(name="test.scope"),
            resource_schema_url="",
            scope_schema_url="",
            service_name=service,
            project=None,
        )
    return found


def record(
    *,
    trace: int = 1,
    span: int = 1,
    parent: int | None = None,
    end_ms: int = T0_MS + 100,
    duration_ms: float = 100,
    agent: str | None = None,
    service: str | None = "svc",
    error: bool = False,
    llm: bool = False,
    tokens: tuple[int, int, int] = (0, 0, 0),
    cost_nanos: int = 0,
    dimensions: tuple[str, ...] = (),
) -> SpanRecord:
    """A span record as ``extract_spans`` would make it, without the protobuf detour."""
    end_ns = end_ms * NANOS_PER_MILLI
    return SpanRecord(
        trace_id=tid(trace),
        span_id=sid(span),
        parent_span_id=b"" if parent is None else sid(parent),
        start_ns=end_ns - round(duration_ms * NANOS_PER_MILLI),
        end_ns=end_ns,
        end_ms=end_ns // NANOS_PER_MILLI,
        is_error=error,
        own_agent=agent,
        is_llm=llm,
        tokens_prompt=tokens[0],
        tokens_completion=tokens[1],
        tokens_total=tokens[2],
        cost_nanos=cost_nanos,
        dimensions=dimensions,
        tracestate="",
        origin=origin(service),
        source=MessageSource([Span()]),
        position=0,
    )
