"""The compact span record every later stage works on.

A record carries what attribution, windows and aggregates need, already extracted from the
attributes, plus a reference to the original protobuf span and its origin (resource and scope)
so that the span can still be forwarded to Phoenix unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

NANOS_PER_MILLI = 1_000_000
COST_NANOS_PER_USD = 1_000_000_000


@dataclass(slots=True, eq=False)
class SpanOrigin:
    """The resource and instrumentation scope a group of spans came with."""

    resource: Resource
    scope: InstrumentationScope
    resource_schema_url: str
    scope_schema_url: str
    service_name: str | None
    project: str | None


@dataclass(slots=True, eq=False)
class SpanRecord:
    """One validated span. Ids are raw bytes; times are integer nanoseconds since the epoch."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes  # b"" for a root span
    start_ns: int
    end_ns: int
    end_ms: int  # end_ns // NANOS_PER_MILLI, read many times per span on the hot path
    is_error: bool
    own_agent: str | None  # the span's own agent attribute, before attribution
    is_llm: bool
    tokens_prompt: int
    tokens_completion: int
    tokens_total: int
    cost_nanos: int  # cost in 1e-9 USD: integers keep sums exact in any merge order
    dimensions: tuple[str, ...]  # values of the configured extra dimensions, in order
    tracestate: str
    origin: SpanOrigin
    pb: Span
    # The upstream adjusted count minus one, in millionths (``sketch.WEIGHT_ONE``): non-zero
    # for a span an upstream sampler kept with a probability below one (its tracestate's th).
    extra_weight: int = 0

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / NANOS_PER_MILLI

    @property
    def service_name(self) -> str | None:
        return self.origin.service_name


@dataclass(slots=True, frozen=True)
class RejectedSpan:
    """A span that broke a rule: it goes to the dead-letter topic with ``reason``."""

    reason: str
    detail: str
    pb: Span
    origin: SpanOrigin


@dataclass(slots=True)
class DecodedMessage:
    """The outcome of decoding one Kafka message: good spans and rejected ones."""

    spans: list[SpanRecord]
    rejected: list[RejectedSpan]
