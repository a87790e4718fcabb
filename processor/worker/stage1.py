"""Stage 1 adapter: decode messages, feed each partition's aggregator, emit partials.

The decisions live in ``processor.core``; this module moves bytes between Kafka, the core and
the sinks, and keeps one ``PartitionAggregator`` per assigned source partition.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace

from processor.clock import Clock
from processor.core.attribution import TraceAssembler
from processor.core.decoding import decode_spans
from processor.core.partition import AdvanceResult, Checkpoint, PartitionAggregator
from processor.core.repartition import SOURCE_HEADER, SourceMarks, parse_source_tag
from processor.core.rollup import PartialRollup, PartitionProgress
from processor.core.sampling import SamplingPolicy, TraceSampler, mark_forwarded
from processor.core.semconv import ExtractionConfig
from processor.core.spans import DecodedMessage, MessageSource, RejectedSpan
from processor.errors import InvalidInput
from processor.sinks.otlp_batch import build_request
from processor.worker.assignment import ResumeWatch
from processor.worker.forwarding import SpanForwarder, SpanItem

log = logging.getLogger(__name__)

MIN_TRACE_TTL_MS = 10_000
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000

SendRecord = Callable[[bytes, bytes, int | None], Awaitable[None]]  # key, value, partition


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    reason: str
    detail: str
    source_partition: int
    source_offset: int
    key: bytes | None


SendDeadLetter = Callable[[DeadLetter], Awaitable[None]]


async def route_dead_letter(
    letter: DeadLetter, *, counters: Stage1Counters, send: SendDeadLetter
) -> None:
    """Count a dead letter by reason, log it, send it: the same in stage 0 and stage 1, so
    /metrics counts every dead letter by reason whichever stage found it."""
    counters.dead_letters += 1
    reasons = counters.dead_letters_by_reason
    reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
    log.warning(
        "dead letter from partition %d offset %d: %s %s",
        letter.source_partition,
        letter.source_offset,
        letter.reason,
        letter.detail,
        extra={"partition": letter.source_partition, "offset": letter.source_offset},
    )
    await send(letter)


@dataclass(slots=True)
class Stage1Counters:
    messages: int = 0
    spans: int = 0
    dead_letters: int = 0
    partials: int = 0
    # Never reset (a revocation keeps them): the worker's /metrics reads them.
    messages_by_partition: dict[int, int] = field(default_factory=dict)
    spans_by_partition: dict[int, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_messages: int = 0
    duplicate_pieces: int = 0  # repartition pieces a stage-0 replay sent again: dropped


def partials_partition_of(agent: str, partitions: int) -> int:
    """Stage 2 is keyed by agent: every partial of one agent goes to the same partition."""
    return zlib.crc32(agent.encode()) % partitions


class Stage1:
    def __init__(
        self,
        *,
        window_size_ms: int,
        allowed_lateness_ms: int,
        idle_timeout_ms: int,
        max_traces: int,
        max_series_per_window: int,
        partials_partitions: int,
        extraction: ExtractionConfig,
        forwarder: SpanForwarder | None,
        sampling: SamplingPolicy | None,
        send_partial: SendRecord,
        send_dead_letter: SendDeadLetter,
        clock: Clock,
        repartitioned: bool = False,
    ) -> None:
        self._window_size_ms = window_size_ms
        self._allowed_lateness_ms = allowed_lateness_ms
        self._idle_timeout_ms = idle_timeout_ms
        self._max_traces = max_traces
        # A trace is remembered (for children that come late) as long as a span may be late.
        self._trace_ttl_ms = max(allowed_lateness_ms, MIN_TRACE_TTL_MS)
        self._max_series = max_series_per_window
        self._partials_partitions = partials_partitions
        self._extraction = extraction
        self._forwarder = forwarder
        self._sampling = sampling  # None: every span goes to Phoenix
        self._send_partial = send_partial
        self._send_dead_letter = send_dead_letter
        self._clock = clock
        self.partitions: dict[int, PartitionAggregator] = {}
        self._next_offset: dict[int, int] = {}
        # Reading the repartition topic: the stage-0 pieces taken, per partition.
        self._repartitioned = repartitioned
        self._marks: dict[int, SourceMarks] = {}
        self._resume = ResumeWatch(log, stage=1)
        self.counters = Stage1Counters()

    @property
    def samples(self) -> bool:
        """Whether a sampler decides which spans go to Phoenix (else all of them do)."""
        return self._sampling is not None

    def assign(
        self, partition: int, checkpoint: Checkpoint | None, committed: int | None = None
    ) -> None:
        """Take over ``partition``, resuming from the checkpoint committed with its offset.

        ``committed`` is the group's committed offset (None: no commit yet), for the log.
        """
        aggregator = PartitionAggregator(
            partition,
            window_size_ms=self._window_size_ms,
            allowed_lateness_ms=self._allowed_lateness_ms,
            idle_timeout_ms=self._idle_timeout_ms,
            max_series_per_window=self._max_series,
            assembler=TraceAssembler(
                max_traces=self._max_traces,
                attribution_wait_ms=self._allowed_lateness_ms,
                trace_ttl_ms=self._trace_ttl_ms,
            ),
            trace_ttl_ms=self._trace_ttl_ms,
            sampler=TraceSampler(self._sampling) if self._sampling is not None else None,
        )
        if checkpoint is not None:
            aggregator.restore(checkpoint)
            self._next_offset[partition] = checkpoint.offset
        self._marks[partition] = SourceMarks(checkpoint.sources if checkpoint else ())
        # The idle timeout counts from the assignment: a partition just taken over has not had
        # the chance to deliver anything yet.
        aggregator.watermark.touch(self._clock())
        self.partitions[partition] = aggregator
        self._resume.expect(partition, committed)

    def next_offset(self, partition: int) -> int | None:
        """The offset after the last message handled (or the checkpoint's, before any)."""
        return self._next_offset.get(partition)

    def revoke_all(self) -> None:
        # Every rebalance restarts each partition at its committed offset, here or elsewhere:
        # the state is rebuilt from the checkpoint and the replay.
        self.partitions.clear()
        self._next_offset.clear()
        self._marks.clear()
        self._resume.clear()

    async def handle(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes],
    ) -> None:
        aggregator = self.partitions.get(partition)
        expected = self._next_offset.get(partition)
        if aggregator is None or (expected is not None and offset < expected):
            # Read before a rebalance took the partition away, or already seen: whoever owns
            # the partition now reads it again from the committed offset.
            self.counters.skipped_messages += 1
            return
        self._resume.handled(partition, offset)
        counters = self.counters
        self._next_offset[partition] = offset + 1
        if self._repartitioned and self._is_duplicate(partition, offset, headers):
            counters.duplicate_pieces += 1
            return
        counters.messages += 1
        counters.messages_by_partition[partition] = (
            counters.messages_by_partition.get(partition, 0) + 1
        )
        payload = value or b""
        content_type = headers.get("content-type")
        media_type = content_type.decode("latin-1") if content_type else None
        try:
            decoded = decode_spans(payload, media_type, self._extraction)
        except InvalidInput as exc:
            aggregator.watermark.touch(self._clock())
            await self._dead_letter(payload, exc.reason, exc.detail, partition, offset, key)
            return
        try:
            await self._take(decoded, aggregator, partition, offset, key)
        finally:
            # Spans still buffered keep the payload, not the parsed message (see MessageSource)
            decoded.source.release()

    async def _take(
        self,
        decoded: DecodedMessage,
        aggregator: PartitionAggregator,
        partition: int,
        offset: int,
        key: bytes | None,
    ) -> None:
        counters = self.counters
        now_ms = self._clock()
        future = [span for span in decoded.spans if span.end_ms > now_ms + MAX_CLOCK_SKEW_MS]
        if future:
            decoded.source.hold()  # their protobuf spans go to the dead-letter topic
            # One span from a clock far ahead would drag the watermark along and make every
            # later span of the partition late: it is the input's fault, so a dead letter.
            decoded.spans = [
                span for span in decoded.spans if span.end_ms <= now_ms + MAX_CLOCK_SKEW_MS
            ]
            decoded.rejected.extend(
                RejectedSpan(
                    "end_in_future",
                    f"ends {span.end_ms - now_ms} ms after this worker's clock",
                    span.pb,
                    span.origin,
                )
                for span in future
            )
        if decoded.rejected:
            await self._reject_spans(decoded.rejected, partition, offset, key)
        counters.spans += len(decoded.spans)
        counters.spans_by_partition[partition] = counters.spans_by_partition.get(
            partition, 0
        ) + len(decoded.spans)
        aggregator.add(offset, decoded.spans, self._clock())
        await self._forward(partition, aggregator)

    def _is_duplicate(self, partition: int, offset: int, headers: Mapping[str, bytes]) -> bool:
        tag = headers.get(SOURCE_HEADER)
        parsed = parse_source_tag(tag) if tag is not None else None
        if parsed is None:
            return False  # not from stage 0: nothing to compare with
        source_partition, mark = parsed
        return not self._marks[partition].take(offset, source_partition, mark)

    async def _forward(self, partition: int, aggregator: PartitionAggregator) -> None:
        """Send the spans whose trace was just kept to Phoenix, per source message."""
        kept = aggregator.take_kept()
        if self._forwarder is None or not kept:
            return
        by_offset: dict[int, list[SpanItem]] = {}
        held: dict[int, MessageSource] = {}
        for item in kept:
            source = item.source
            if id(source) not in held:
                source.hold()  # one parse per message, not one per span
                held[id(source)] = source
            pb = item.pb
            if item.reason is not None:  # a sampler decided: say why on the span
                mark_forwarded(pb, item)
            by_offset.setdefault(item.offset, []).append((item.origin, pb))
        # The items hold their spans: a message handled meanwhile may release a source.
        for source in held.values():
            source.release()
        for offset, items in by_offset.items():
            await self._forwarder.add(items, partition=partition, offset=offset)

    async def _reject_spans(
        self, rejected: list[RejectedSpan], partition: int, offset: int, key: bytes | None
    ) -> None:
        for item in rejected:
            value = build_request([(item.origin, item.pb)]).SerializeToString()
            await self._dead_letter(value, item.reason, item.detail, partition, offset, key)

    async def _dead_letter(
        self,
        value: bytes,
        reason: str,
        detail: str,
        partition: int,
        offset: int,
        key: bytes | None,
    ) -> None:
        await route_dead_letter(
            DeadLetter(value, reason, detail, partition, offset, key),
            counters=self.counters,
            send=self._send_dead_letter,
        )

    async def tick(self, caught_up: Callable[[int], bool]) -> dict[int, Checkpoint]:
        """Advance every partition's watermark, send what closed, return safe checkpoints.

        A checkpoint's offset has everything before it in a partial handed to the producer
        (faust flushes the producer before it commits) and accepted by Phoenix.
        """
        now = self._clock()
        checkpoints: dict[int, Checkpoint] = {}
        for partition, aggregator in list(self.partitions.items()):
            result = aggregator.advance(now, caught_up=caught_up(partition))
            await self._emit(result)
            await self._forward(partition, aggregator)
            next_offset = self._next_offset.get(partition)
            if next_offset is None or self.partitions.get(partition) is not aggregator:
                continue  # nothing read yet, or revoked while we were sending
            limit = (
                self._forwarder.pending_offset(partition) if self._forwarder is not None else None
            )
            checkpoint = aggregator.checkpoint(next_offset, limit=limit)
            marks = self._marks.get(partition)
            if self._repartitioned and marks is not None:
                checkpoint = replace(checkpoint, sources=marks.as_of(checkpoint.offset))
                marks.forget_before(checkpoint.offset)
            checkpoints[partition] = checkpoint
        return checkpoints

    async def _emit(self, result: AdvanceResult) -> None:
        for partial in result.partials:
            await self._send_partial_record(partial)
        if result.progress is not None:
            await self._broadcast_progress(result.progress)

    async def _send_partial_record(self, partial: PartialRollup) -> None:
        self.counters.partials += 1
        target = partials_partition_of(partial.series.agent, self._partials_partitions)
        await self._send_partial(partial.key(), partial.to_bytes(), target)

    async def _broadcast_progress(self, progress: PartitionProgress) -> None:
        # Every stage-2 partition must learn how far this source partition has got.
        key, value = progress.key(), progress.to_bytes()
        for target in range(self._partials_partitions):
            await self._send_partial(key, value, target)
