"""OTLP trace requests at the level of protobuf's wire format: spans as byte ranges.

A kept span goes to the sampled topic as it arrived plus two marks (``sampling.reason`` and
the ``th`` of its tracestate). Parsing its message with the OTLP classes, copying the span into
a new request and encoding that again cost more than everything else the worker does with the
span; on the wire none of it is needed:

- ``index_request`` finds, in a request that parsed already, each span's bytes and those of
  its resource and scope (every field of ``ResourceSpans`` and ``ScopeSpans`` but their spans),
  in the order the OTLP classes list the spans.
- Marks are appended to the span's bytes (``span_marks``): a repeated field (``attributes``)
  may come in any order, and a singular one (``trace_state``) takes its last value, so the
  span reads as the marked span would.
- ``encode_request`` writes spans grouped by origin as an ``ExportTraceServiceRequest``.

Unknown fields pass through unchanged, as they did through the OTLP classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Field numbers of opentelemetry/proto/trace/v1/trace.proto and its request.
_REQUEST_RESOURCE_SPANS = 1
_RESOURCE_SPANS_SCOPE_SPANS = 2
_SCOPE_SPANS_SPANS = 2
_SPAN_TRACE_STATE = 3
_SPAN_ATTRIBUTES = 9
_KEY_VALUE_KEY = 1
_KEY_VALUE_VALUE = 2
_ANY_VALUE_STRING = 1

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_SPANS_TAG = bytes((_SCOPE_SPANS_SPANS << 3 | _LEN,))


class WireError(ValueError):
    """The bytes use what OTLP never does (groups), or end inside a field."""


@dataclass(frozen=True, slots=True)
class Origin:
    """A resource and scope as they came: every field of the ``ResourceSpans`` but its
    ``scope_spans``, and of the ``ScopeSpans`` but its ``spans``. Compared by identity: one
    per ``ScopeSpans`` of a message."""

    resource: bytes
    scope: bytes


@dataclass(frozen=True, slots=True)
class RequestIndex:
    """Where each span of a request is: ``spans[i]`` is the i-th span in request order."""

    payload: bytes
    spans: list[tuple[Origin, int, int]]  # (origin, start, end) of the span's bytes

    def span_bytes(self, position: int) -> bytes:
        _, start, end = self.spans[position]
        return self.payload[start:end]

    def origin(self, position: int) -> Origin:
        return self.spans[position][0]


def index_request(payload: bytes) -> RequestIndex:
    """The spans of a request (which parsed as one already) as byte ranges of ``payload``."""
    spans: list[tuple[Origin, int, int]] = []
    data = memoryview(payload)
    for number, start, end, _ in _fields(data, 0, len(payload)):
        if number != _REQUEST_RESOURCE_SPANS or start < 0:
            continue  # unknown request fields belong to no span
        resource, scopes = _split(payload, data, start, end, _RESOURCE_SPANS_SCOPE_SPANS)
        for scope_start, scope_end in scopes:
            scope, ranges = _split(payload, data, scope_start, scope_end, _SCOPE_SPANS_SPANS)
            origin = Origin(resource, scope)
            spans.extend((origin, span_start, span_end) for span_start, span_end in ranges)
    return RequestIndex(payload, spans)


def _split(
    payload: bytes, data: memoryview, start: int, end: int, inner: int
) -> tuple[bytes, list[tuple[int, int]]]:
    """A message's fields but ``inner`` (as bytes), and where each ``inner`` value is."""
    head: list[bytes] = []
    ranges: list[tuple[int, int]] = []
    for field, field_start, field_end, raw_start in _fields(data, start, end):
        if field == inner and field_start >= 0:
            ranges.append((field_start, field_end))
        else:
            head.append(payload[raw_start:field_end])
    return b"".join(head), ranges


def span_marks(reason: str, tracestate: str | None) -> bytes:
    """What to append to a span's bytes to give it the attribute ``sampling.reason`` =
    ``reason`` and, unless None, the tracestate ``tracestate``. The caller makes sure the span
    has no ``sampling.reason`` of its own (a repeated key would keep both)."""
    value = _len_field(_ANY_VALUE_STRING, reason.encode())
    attribute = _len_field(_KEY_VALUE_KEY, b"sampling.reason") + _len_field(_KEY_VALUE_VALUE, value)
    marks = _len_field(_SPAN_ATTRIBUTES, attribute)
    if tracestate is not None:
        marks += _len_field(_SPAN_TRACE_STATE, tracestate.encode())
    return marks


def encode_request(spans: Iterable[tuple[Origin, bytes]]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans``: one ``ResourceSpans`` per origin, in the
    order origins first come, each origin's spans in the order given."""
    groups: dict[int, tuple[Origin, list[bytes]]] = {}
    varint = _varint
    for origin, span in spans:
        group = groups.get(id(origin))
        if group is None:
            group = groups[id(origin)] = (origin, [origin.scope])
        group[1].extend((_SPANS_TAG, varint(len(span)), span))
    parts: list[bytes] = []
    for origin, encoded in groups.values():
        scope_spans = _len_field(_RESOURCE_SPANS_SCOPE_SPANS, b"".join(encoded))
        parts.append(_len_field(_REQUEST_RESOURCE_SPANS, origin.resource + scope_spans))
    return b"".join(parts)


def origin_size(origin: Origin) -> int:
    """What an origin adds to a request around its spans, at most (lengths are varints)."""
    return len(origin.resource) + len(origin.scope) + 2 * 11


def origin_of(
    resource: bytes, resource_schema_url: str, scope: bytes, scope_schema_url: str
) -> Origin:
    """An origin from its encoded ``Resource`` and ``InstrumentationScope``."""
    return Origin(
        _len_field(1, resource) + _string_field(3, resource_schema_url),
        _len_field(1, scope) + _string_field(3, scope_schema_url),
    )


def _string_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


def _len_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(value)) + value


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:  # most spans' lengths
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, position: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= end:
            raise WireError("a varint runs past its field")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _fields(data: memoryview, position: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """(field number, value start or -1 when not length-delimited, field end, tag start)."""
    while position < end:
        tag_start = position
        tag, position = _read_varint(data, position, end)
        wire_type = tag & 7
        if wire_type == _LEN:
            length, position = _read_varint(data, position, end)
            value_end = position + length
            if value_end > end:
                raise WireError("a field runs past its message")
            yield tag >> 3, position, value_end, tag_start
            position = value_end
            continue
        if wire_type == _VARINT:
            _, position = _read_varint(data, position, end)
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _FIXED32:
            position += 4
        else:
            raise WireError(f"wire type {wire_type} (groups) is not used by OTLP")
        if position > end:
            raise WireError("a field runs past its message")
        yield tag >> 3, -1, position, tag_start
