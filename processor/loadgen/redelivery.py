"""Spans delivered twice, as at-least-once producers deliver them.

An SDK that retries a batch after a timeout, the Collector's Kafka exporter, an agent that
re-sends: each can put a span on the topic more than once. `Redelivery` picks a fraction of
traces (from its seed) and gives each of them one of three kinds of copies:

- ``message``: the whole message published again, a few messages later (a retried batch);
- ``inside``: one to three of its spans repeated inside its own message;
- ``alone``: one to three of its spans published again in a message of their own, right after.

Every message goes to the trace's partition (key = trace id), so a copy always comes after its
original's first delivery or with it. A `Delivery` says which spans it delivers again, so the
truth counts each span once and every copy in ``duplicate_spans``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processor.loadgen.traces import GeneratedTrace

KINDS = ("message", "inside", "alone")
_MAX_MESSAGE_DELAY = 3  # a whole message comes again up to this many messages later


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as published: ``trace``'s spans (``first``) and/or copies of some of them.

    ``copies`` maps a span id to how many extra times this message delivers it."""

    trace: GeneratedTrace
    payload: bytes
    span_count: int
    error_count: int
    first: bool
    copies: dict[bytes, int] = field(default_factory=dict)

    @property
    def trace_id_hex(self) -> str:
        return self.trace.trace_id_hex


class Redelivery:
    """Turns traces into the messages an at-least-once producer would publish."""

    def __init__(self, *, fraction: float, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the fraction of traces redelivered must be in 0..1, not {fraction}")
        self.fraction = fraction
        self._random = random.Random(seed ^ 0x5EED_D0B1)
        # (messages still to go out before it, the delivery)
        self._later: list[tuple[int, Delivery]] = []

    def deliveries(self, trace: GeneratedTrace) -> list[Delivery]:
        """What to publish now for ``trace``, in order: its message, copies that follow it, and
        whole-message copies of earlier traces whose turn has come."""
        due = self._due()
        if not self.fraction or self._random.random() >= self.fraction:
            return [_whole(trace), *due]
        kind = self._random.choice(KINDS)
        if kind == "message":
            delay = self._random.randint(0, _MAX_MESSAGE_DELAY)
            copy = _whole(trace, again=True)
            if delay == 0:
                return [_whole(trace), copy, *due]
            self._later.append((delay, copy))
            return [_whole(trace), *due]
        spans = _spans_of(trace.request)
        chosen = self._random.sample(spans, k=min(len(spans), self._random.randint(1, 3)))
        if kind == "inside":
            return [_with_copies_inside(trace, chosen), *due]
        return [_whole(trace), _alone(trace, chosen), *due]

    def drain(self) -> list[Delivery]:
        """The copies still held back, at the end of a run."""
        held = [delivery for _, delivery in self._later]
        self._later = []
        return held

    def _due(self) -> list[Delivery]:
        due: list[Delivery] = []
        waiting: list[tuple[int, Delivery]] = []
        for left, delivery in self._later:
            if left <= 1:
                due.append(delivery)
            else:
                waiting.append((left - 1, delivery))
        self._later = waiting
        return due


async def with_redeliveries(
    traces: AsyncIterable[GeneratedTrace], redelivery: Redelivery
) -> AsyncIterator[Delivery]:
    async for trace in traces:
        for delivery in redelivery.deliveries(trace):
            yield delivery
    for delivery in redelivery.drain():
        yield delivery


def _whole(trace: GeneratedTrace, *, again: bool = False) -> Delivery:
    copies = dict.fromkeys(trace.span_ids, 1) if again else {}
    return Delivery(
        trace, trace.payload, trace.span_count, trace.error_count, first=not again, copies=copies
    )


def _spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    return [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def _with_copies_inside(trace: GeneratedTrace, chosen: list[Span]) -> Delivery:
    request = ExportTraceServiceRequest()
    request.CopyFrom(trace.request)
    # GeneratedTrace holds one ResourceSpans with one ScopeSpans
    request.resource_spans[0].scope_spans[0].spans.extend(chosen)
    return Delivery(
        trace,
        request.SerializeToString(),
        trace.span_count + len(chosen),
        trace.error_count + _errors(chosen),
        first=True,
        copies=_count(chosen),
    )


def _alone(trace: GeneratedTrace, chosen: list[Span]) -> Delivery:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    original = trace.request.resource_spans[0]
    resource_spans.resource.CopyFrom(original.resource)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.CopyFrom(original.scope_spans[0].scope)
    scope_spans.spans.extend(chosen)
    return Delivery(
        trace,
        request.SerializeToString(),
        len(chosen),
        _errors(chosen),
        first=False,
        copies=_count(chosen),
    )


def _errors(spans: list[Span]) -> int:
    return sum(span.status.code == Status.STATUS_CODE_ERROR for span in spans)


def _count(spans: list[Span]) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for span in spans:
        counts[span.span_id] = counts.get(span.span_id, 0) + 1
    return counts
