"""Kept spans as records of the sampled topic, and back: the hand-off from aggregate to forward.

A record holds kept spans of one trace as an OTLP protobuf ``ExportTraceServiceRequest``,
grouped by resource and scope as they arrived, keyed by the trace id's 16 bytes (the key the
agents use, so a trace stays on one partition of the sampled topic too). The spans already
carry their sampling marks (``sampling.reason``, ``th`` in the tracestate). A trace whose spans
would make a record over ``max_record_bytes`` is split over several records.

Replays may write a kept span twice; the forward role and Phoenix are idempotent by span id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.decoding import resource_values
from processor.core.spans import SpanOrigin
from processor.errors import InvalidInput
from processor.sinks.otlp_batch import build_request

# The broker's default message.max.bytes is 1 MiB; leave room for the record's own framing.
MAX_RECORD_BYTES = 900_000
_SPAN_FRAMING_BYTES = 8  # a span's tag and length prefixes inside its ScopeSpans
_ORIGIN_FRAMING_BYTES = 32  # a ResourceSpans + ScopeSpans around the first span of an origin

SpanItem = tuple[SpanOrigin, Span]


@dataclass(frozen=True, slots=True)
class KeptSpan:
    """A kept span on its way to the sampled topic: its trace, origin and (marked) protobuf."""

    trace_id: bytes
    origin: SpanOrigin
    span: Span


def kept_span_records(
    spans: Iterable[KeptSpan], *, max_record_bytes: int = MAX_RECORD_BYTES
) -> list[tuple[bytes, bytes]]:
    """(key, value) records for ``spans``: one per trace, more when a trace's spans exceed
    ``max_record_bytes`` (a single span larger than that still gets a record of its own)."""
    by_trace: dict[bytes, list[KeptSpan]] = {}
    for kept in spans:
        by_trace.setdefault(kept.trace_id, []).append(kept)
    records: list[tuple[bytes, bytes]] = []
    for trace_id, kept_spans in by_trace.items():
        chunk: list[SpanItem] = []
        origins: set[int] = set()
        size = 0
        for kept in kept_spans:
            added = kept.span.ByteSize() + _SPAN_FRAMING_BYTES
            if id(kept.origin) not in origins:
                added += _origin_bytes(kept.origin)
            if chunk and size + added > max_record_bytes:
                records.append((trace_id, build_request(chunk).SerializeToString()))
                chunk, origins, size = [], set(), 0
                added = kept.span.ByteSize() + _SPAN_FRAMING_BYTES + _origin_bytes(kept.origin)
            chunk.append((kept.origin, kept.span))
            origins.add(id(kept.origin))
            size += added
        records.append((trace_id, build_request(chunk).SerializeToString()))
    return records


def spans_of_record(value: bytes) -> list[SpanItem]:
    """The spans of a sampled-topic record, each with its origin.

    Raises ``InvalidInput`` (reason ``invalid_protobuf``) for bytes that are not an OTLP
    export request: only aggregate writes this topic, so that is a foreign writer or a bug.
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(value)
    except DecodeError as exc:
        raise InvalidInput("invalid_protobuf", f"not an OTLP export request: {exc}") from exc
    items: list[SpanItem] = []
    for resource_spans in request.resource_spans:
        resource = Resource()
        resource.CopyFrom(resource_spans.resource)
        service_name, project, _ = resource_values(resource.attributes, ())
        for scope_spans in resource_spans.scope_spans:
            scope = InstrumentationScope()
            scope.CopyFrom(scope_spans.scope)
            origin = SpanOrigin(
                resource=resource,
                scope=scope,
                resource_schema_url=resource_spans.schema_url,
                scope_schema_url=scope_spans.schema_url,
                service_name=service_name,
                project=project,
            )
            items.extend((origin, span) for span in scope_spans.spans)
    return items


def _origin_bytes(origin: SpanOrigin) -> int:
    return (
        origin.resource.ByteSize()
        + origin.scope.ByteSize()
        + len(origin.resource_schema_url)
        + len(origin.scope_schema_url)
        + _ORIGIN_FRAMING_BYTES
    )
