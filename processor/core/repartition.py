"""Split one export request into one request per trace, for the repartition by trace id.

A Collector's Kafka exporter without ``partition_traces_by_id`` writes whole batches, unkeyed,
to any partition: the spans of one trace can sit in several messages on several partitions,
while trace assembly needs them all on one. The repartition therefore splits each message per trace
and publishes the pieces keyed by trace id (the key ``processor.publishing`` uses), so that
the usual partitioner puts every piece of a trace on the same partition of the repartition
topic, where aggregate reads them.

Each piece is tagged with where it came from, ``<partition>:<offset>:<piece>``. A stage-0
replay after a crash publishes the same pieces again, in the same order; aggregate drops a piece
at or below the highest tag it has already taken from that source partition (``SourceMarks``),
so nothing is counted twice without Kafka transactions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

SOURCE_HEADER = "repartition.source"

Mark = tuple[int, int]  # (source offset, piece index): pieces of a source partition in order


@dataclass(frozen=True, slots=True)
class TracePiece:
    key: bytes  # the trace id in lowercase hex, like every keyed producer's
    request: ExportTraceServiceRequest
    span_count: int


def split_by_trace(request: ExportTraceServiceRequest) -> list[TracePiece]:
    """One request per trace id, in order of first appearance; resources, scopes and schema
    URLs kept, spans unchanged. Spans without a valid trace id travel together under the key
    of their bytes, so aggregate dead-letters them with its reason."""
    pieces: dict[bytes, tuple[ExportTraceServiceRequest, dict[tuple[int, int], ScopeSpans]]] = {}
    counts: dict[bytes, int] = {}
    for r, resource_spans in enumerate(request.resource_spans):
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for span in scope_spans.spans:
                trace_id = span.trace_id
                entry = pieces.get(trace_id)
                if entry is None:
                    entry = pieces[trace_id] = (ExportTraceServiceRequest(), {})
                piece, scopes = entry
                target = scopes.get((r, s))
                if target is None:
                    copy = piece.resource_spans.add()
                    copy.resource.CopyFrom(resource_spans.resource)
                    copy.schema_url = resource_spans.schema_url
                    target = scopes[(r, s)] = copy.scope_spans.add()
                    target.scope.CopyFrom(scope_spans.scope)
                    target.schema_url = scope_spans.schema_url
                target.spans.append(span)
                counts[trace_id] = counts.get(trace_id, 0) + 1
    return [
        TracePiece(trace_id.hex().encode("ascii"), piece, counts[trace_id])
        for trace_id, (piece, _) in pieces.items()
    ]


def source_tag(partition: int, offset: int, piece: int) -> bytes:
    return f"{partition}:{offset}:{piece}".encode("ascii")


def parse_source_tag(value: bytes) -> tuple[int, Mark] | None:
    """(source partition, (offset, piece)) of a tag; None if it is not one."""
    try:
        partition, offset, piece = (int(part) for part in value.decode("ascii").split(":"))
    except (UnicodeDecodeError, ValueError):
        return None
    if min(partition, offset, piece) < 0:
        return None
    return partition, (offset, piece)


class SourceMarks:
    """The highest piece taken from each source partition, as of any recent offset.

    ``take`` says whether a piece is new; ``as_of(offset)`` gives the marks as they were just
    before the message at ``offset`` of the repartition topic, which is what a checkpoint at
    that offset must carry (a replay from there must drop exactly what the first run did).
    """

    def __init__(self, marks: Iterable[tuple[int, int, int]] = ()) -> None:
        self._marks: dict[int, Mark] = {p: (o, i) for p, o, i in marks}
        # (offset of the message that moved a mark, source partition, mark before it)
        self._undo: deque[tuple[int, int, Mark | None]] = deque()

    def take(self, offset: int, source_partition: int, mark: Mark) -> bool:
        previous = self._marks.get(source_partition)
        if previous is not None and mark <= previous:
            return False  # a stage-0 replay's copy of a piece already taken
        self._undo.append((offset, source_partition, previous))
        self._marks[source_partition] = mark
        return True

    def as_of(self, offset: int) -> tuple[tuple[int, int, int], ...]:
        marks = dict(self._marks)
        for moved_at, partition, previous in reversed(self._undo):
            if moved_at < offset:
                break
            if previous is None:
                marks.pop(partition, None)
            else:
                marks[partition] = previous
        return tuple(sorted((p, o, i) for p, (o, i) in marks.items()))

    def forget_before(self, offset: int) -> None:
        """Drop history a checkpoint will never need again (it never moves back)."""
        undo = self._undo
        while undo and undo[0][0] < offset:
            undo.popleft()
