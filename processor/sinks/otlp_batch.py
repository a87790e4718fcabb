"""Build OTLP export requests from span records, grouped the way they arrived."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from processor.core.spans import SpanOrigin


def build_request(items: Iterable[tuple[SpanOrigin, Span]]) -> ExportTraceServiceRequest:
    """One ResourceSpans/ScopeSpans per distinct origin, spans copied unchanged."""
    request = ExportTraceServiceRequest()
    groups: dict[int, ScopeSpans] = {}
    for origin, span in items:
        scope_spans = groups.get(id(origin))
        if scope_spans is None:
            resource_spans: ResourceSpans = request.resource_spans.add()
            resource_spans.resource.CopyFrom(origin.resource)
            resource_spans.schema_url = origin.resource_schema_url
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.CopyFrom(origin.scope)
            scope_spans.schema_url = origin.scope_schema_url
            groups[id(origin)] = scope_spans
        scope_spans.spans.append(span)
    return request
