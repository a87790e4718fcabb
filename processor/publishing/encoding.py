"""Spans to Kafka messages: one OTLP protobuf request per trace, keyed by the trace id.

Pure: no Kafka here. The key is the trace id in lowercase hex (ASCII), the key the load
generator and the OpenTelemetry Collector's Kafka exporter (``partition_traces_by_id``) use, so
every span of a trace lands on the same partition and the worker can assemble the trace. A trace
whose request would exceed ``max_message_bytes`` is split into several messages with the same
key; a single span that alone exceeds it cannot be sent and is reported, never sent truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

CONTENT_TYPE = b"application/x-protobuf"
HEADERS = (("content-type", CONTENT_TYPE),)


@dataclass(frozen=True, slots=True)
class TraceMessage:
    """One Kafka record: the OTLP ``ExportTraceServiceRequest`` of spans of one trace."""

    key: bytes
    value: bytes
    span_count: int


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    messages: list[TraceMessage] = field(default_factory=list)
    oversized_spans: int = 0  # spans that alone exceed the message limit: not sent

    @property
    def span_count(self) -> int:
        return sum(message.span_count for message in self.messages)

    @property
    def value_bytes(self) -> int:
        return sum(len(message.value) for message in self.messages)


def trace_key(trace_id: int) -> bytes:
    """The record key of a trace: its 16-byte id as 32 lowercase hex digits."""
    return f"{trace_id:032x}".encode("ascii")


def encode_batch(spans: Sequence[ReadableSpan], *, max_message_bytes: int) -> EncodedBatch:
    """Group ``spans`` by trace (first-seen order, span order kept) and encode each group."""
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        context = span.context
        if context is None:
            continue  # not a span the SDK made; nothing to key it by
        by_trace.setdefault(context.trace_id, []).append(span)
    messages: list[TraceMessage] = []
    oversized = 0
    for trace_id, trace_spans in by_trace.items():
        oversized += _encode_within(trace_key(trace_id), trace_spans, max_message_bytes, messages)
    return EncodedBatch(messages=messages, oversized_spans=oversized)


def _encode_within(
    key: bytes, spans: Sequence[ReadableSpan], limit: int, out: list[TraceMessage]
) -> int:
    """Append messages of at most ``limit`` bytes; return how many spans could not fit."""
    value = encode_spans(spans).SerializeToString()
    if len(value) <= limit:
        out.append(TraceMessage(key=key, value=value, span_count=len(spans)))
        return 0
    if len(spans) == 1:
        return 1
    # Halving keeps the number of encodings O(n log n) in the worst case; real traces are
    # rarely split at all.
    middle = len(spans) // 2
    return _encode_within(key, spans[:middle], limit, out) + _encode_within(
        key, spans[middle:], limit, out
    )
