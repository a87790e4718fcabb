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
from functools import lru_cache

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.decoding import resource_values
from processor.core.otlp_wire import (
    Origin,
    RequestIndex,
    encode_request,
    origin_of,
    origin_size,
    span_marks,
)
from processor.core.sampling import SampledSpan, mark_forwarded
from processor.core.sampling.sampled_span import SAMPLING_REASON_ATTRIBUTE
from processor.core.sampling.tracestate import with_threshold
from processor.core.spans import MessageSource, SpanOrigin
from processor.errors import InvalidInput

# The broker's default message.max.bytes is 1 MiB; leave room for the record's own framing.
MAX_RECORD_BYTES = 900_000
_SPAN_FRAMING_BYTES = 8  # a span's tag and length prefixes inside its ScopeSpans

SpanItem = tuple[SpanOrigin, Span]


@dataclass(frozen=True, slots=True)
class KeptSpan:
    """A kept span on its way to the sampled topic: its trace, origin and marked bytes."""

    trace_id: bytes
    origin: Origin
    span: bytes


def kept_spans_of(items: Iterable[SampledSpan]) -> list[KeptSpan]:
    """Kept spans as they arrived, with their sampling marks (``mark_forwarded``'s).

    A span of a protobuf message is taken from the message's bytes and marked there; one that
    has a ``sampling.reason`` already, or that came as JSON, is parsed and marked by the OTLP
    classes. The messages this reads are released again."""
    kept: list[KeptSpan] = []
    # every source read, with its index (None: not protobuf); released again at the end
    sources: dict[int, tuple[MessageSource, RequestIndex | None]] = {}
    held: set[int] = set()
    origins: dict[int, Origin] = {}
    for item in items:
        source = item.source
        key = id(source)
        known = sources.get(key)
        if known is None:
            known = sources[key] = (source, source.wire_index())
        index = known[1]
        if index is not None:
            span = index.span_bytes(item.position)
            if _REASON_KEY not in span:
                if item.reason is not None:
                    span += _marks(item.reason, item.tracestate, item.threshold)
                kept.append(KeptSpan(item.trace_id, index.origin(item.position), span))
                continue
        if key not in held:
            source.hold()  # one parse per message, not one per span
            held.add(key)
        pb = item.pb
        if item.reason is not None:
            mark_forwarded(pb, item)
        if index is not None:
            origin = index.origin(item.position)
        else:
            origin = origins.get(id(item.origin)) or origins.setdefault(
                id(item.origin), wire_origin(item.origin)
            )
        kept.append(KeptSpan(item.trace_id, origin, pb.SerializeToString()))
    for source, _ in sources.values():
        source.release()  # neither the parsed spans nor the index stay with buffered spans
    return kept


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
        chunk: list[tuple[Origin, bytes]] = []
        origins: set[int] = set()
        size = 0
        for kept in kept_spans:
            added = len(kept.span) + _SPAN_FRAMING_BYTES
            if id(kept.origin) not in origins:
                added += origin_size(kept.origin)
            if chunk and size + added > max_record_bytes:
                records.append((trace_id, encode_request(chunk)))
                chunk, origins, size = [], set(), 0
                added = len(kept.span) + _SPAN_FRAMING_BYTES + origin_size(kept.origin)
            chunk.append((kept.origin, kept.span))
            origins.add(id(kept.origin))
            size += added
        records.append((trace_id, encode_request(chunk)))
    return records


def wire_origin(origin: SpanOrigin) -> Origin:
    """The origin of spans parsed by the OTLP classes, as ``kept_span_records`` takes it."""
    return origin_of(
        origin.resource.SerializeToString(),
        origin.resource_schema_url,
        origin.scope.SerializeToString(),
        origin.scope_schema_url,
    )


_REASON_KEY = SAMPLING_REASON_ATTRIBUTE.encode()


@lru_cache(maxsize=4_096)  # most spans share a reason, a threshold and an empty tracestate
def _marks(reason: str, tracestate: str, threshold: int | None) -> bytes:
    """``mark_forwarded``'s marks, as bytes to append to the span's."""
    marked = with_threshold(tracestate, threshold)
    return span_marks(reason, marked if marked != tracestate else None)


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
