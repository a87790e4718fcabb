"""The repartition, part of the aggregate role: rekey by trace id for producers that do not.

Runs only with ``PROCESSOR_REPARTITION_BY_TRACE_ID``. Each message of the spans topic is
decoded, split per trace (``processor.core.repartition``) and published to the repartition
topic keyed by trace id, with a tag saying where it came from; aggregate reads that topic. A
message that does not decode goes to the dead-letter topic with its reason, as in aggregate.
The spans-topic offset is committed by faust after it has flushed the producer, so a piece is
in Kafka before the message it came from counts as done; the duplicates a replay makes are
dropped by aggregate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from processor.core.decoding import decode_request
from processor.core.repartition import SOURCE_HEADER, source_tag, split_by_trace
from processor.errors import InvalidInput
from processor.worker.aggregate import (
    AggregateCounters,
    DeadLetter,
    SendDeadLetter,
    route_dead_letter,
)

PROTOBUF = b"application/x-protobuf"

SendPiece = Callable[[bytes, bytes, dict[str, bytes]], Awaitable[None]]  # key, value, headers


class Repartitioner:
    def __init__(
        self,
        *,
        send_piece: SendPiece,
        send_dead_letter: SendDeadLetter,
        counters: AggregateCounters,
    ) -> None:
        self._send_piece = send_piece
        self._send_dead_letter = send_dead_letter
        # Aggregate's counters: /metrics reports every dead letter by reason, whichever role.
        self.counters = counters

    async def handle(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes],
    ) -> None:
        counters = self.counters
        counters.repartitioned_messages += 1
        payload = value or b""
        content_type = headers.get("content-type")
        try:
            request = decode_request(
                payload, content_type.decode("latin-1") if content_type else None
            )
        except InvalidInput as exc:
            await route_dead_letter(
                DeadLetter(payload, exc.reason, exc.detail, partition, offset, key),
                counters=counters,
                send=self._send_dead_letter,
            )
            return
        for index, piece in enumerate(split_by_trace(request)):
            counters.repartition_pieces += 1
            await self._send_piece(
                piece.key,
                piece.request.SerializeToString(),
                {
                    "content-type": PROTOBUF,
                    SOURCE_HEADER: source_tag(partition, offset, index),
                },
            )
