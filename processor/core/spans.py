"""The compact span record every later stage works on.

A record carries what attribution, windows and aggregates need, already extracted from the
attributes, plus the way back to the original protobuf span (its message and position) and its
origin (resource and scope), so that the span can still be forwarded to Phoenix unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.otlp_wire import RequestIndex, WireError, index_request

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


class MessageSource:
    """The message a record's span came in: the record's way back to its protobuf span.

    It keeps the message's payload and, while held (``hold``, until ``release``), its spans
    as parsed by the OTLP classes; a span asked for while not held is parsed again. upb keeps
    a whole parsed message alive while any part of it is referenced, so a span waiting in a
    buffer for its trace's decision would otherwise keep its parsed message (measured: ~0.4 to
    ~3.5 KiB per span), where its share of the payload is what it took on the wire.
    """

    __slots__ = ("_index", "_parse", "_payload", "_spans", "_wire")

    def __init__(
        self,
        spans: list[Span] | None,
        payload: bytes | None = None,
        parse: Callable[[bytes], list[Span]] | None = None,
        *,
        wire: bool = False,
    ) -> None:
        """``spans`` parsed already (held), or None to parse ``payload`` when asked.
        ``wire``: ``payload`` is the request in protobuf, whose spans ``wire_index`` finds
        as bytes."""
        if spans is None and (payload is None or parse is None):
            raise ValueError("a source needs its spans, or a payload and a way to parse it")
        self._spans: list[Span] | None = spans
        # Without a payload and a way to parse it the spans are held for good.
        self._payload = payload if parse is not None else None
        self._parse = parse
        self._wire = wire and self._payload is not None
        self._index: RequestIndex | None = None

    def span_at(self, position: int) -> Span:
        """The span at ``position`` (the request's order); parsed anew, and not held, once
        released: a caller that wants many spans of one message calls ``hold`` first."""
        spans = self._spans
        if spans is None:
            spans = self._parsed()
        return spans[position]

    def hold(self) -> None:
        if self._spans is None:
            self._spans = self._parsed()

    def wire_index(self) -> RequestIndex | None:
        """Where the spans are in the payload; None when it is not protobuf, or uses what
        OTLP never does (its spans are then read by the OTLP classes). Kept until
        ``release``, like the parsed spans."""
        if not self._wire:
            return None
        if self._index is None:
            assert self._payload is not None
            try:
                self._index = index_request(self._payload)
            except WireError:
                self._wire = False  # once: the bytes do not change
                return None
        return self._index

    def release(self) -> None:
        if self._payload is not None:
            self._spans = None
        self._index = None

    def _parsed(self) -> list[Span]:
        assert self._payload is not None and self._parse is not None  # else never released
        return self._parse(self._payload)


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
    source: MessageSource
    position: int  # the span's place among its message's spans, in the request's order
    # The upstream adjusted count minus one, in millionths (``sketch.WEIGHT_ONE``): non-zero
    # for a span an upstream sampler kept with a probability below one (its tracestate's th).
    extra_weight: int = 0
    # Set by the partition aggregator when the span arrives after its window closed: the
    # open window it is counted in, fixed at arrival so that a replay counts it alike.
    late_window_ms: int | None = None
    # An LLM span's parts of its prompt and completion tokens, the part of ``cost_nanos`` that
    # came from the price table, and whether it had tokens the table could not price.
    tokens_cache_read: int = 0
    tokens_cache_write: int = 0
    tokens_reasoning: int = 0
    cost_estimated_nanos: int = 0
    unpriced: bool = False

    @property
    def pb(self) -> Span:
        """The span as it arrived (parsed again if its message was released)."""
        return self.source.span_at(self.position)

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
    source: MessageSource  # release it once the message is handled
