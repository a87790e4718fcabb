"""The aggregate role: decode messages, feed each source partition's aggregator, emit partials
and kept spans.

The decisions live in ``processor.core``; this module moves bytes between Kafka and the core,
and keeps one ``PartitionAggregator`` per assigned source partition. It writes two topics: the
partials (to finalize) and the kept spans (to forward). Its commit rule mentions neither
MLflow nor Phoenix: ``tick`` returns, per partition, an offset below which every span is in a
partial and, if kept, in a kept-span record, both handed to the producer (faust flushes the
producer, acks=all, before it commits), with the checkpoint a replay from there needs.
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
from processor.core.sampling import SampledSpan, SamplingPolicy, TraceSampler
from processor.core.semconv import ExtractionConfig
from processor.core.spans import DecodedMessage, RejectedSpan
from processor.errors import InvalidInput
from processor.sinks.otlp_batch import build_request
from processor.worker.kept_spans import MAX_RECORD_BYTES, kept_span_records, kept_spans_of
from processor.worker.offsets import Commit, PartitionOffsets

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
    letter: DeadLetter, *, counters: AggregateCounters, send: SendDeadLetter
) -> None:
    """Count a dead letter by reason, log it, send it: the same in the repartition and in
    aggregate, so /metrics counts every dead letter by reason whichever role found it."""
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
class AggregateCounters:
    messages: int = 0
    spans: int = 0
    dead_letters: int = 0
    partials: int = 0
    kept_spans: int = 0  # written to the sampled topic (a replay writes some again)
    kept_records: int = 0
    # Never reset (a revocation keeps them): the worker's /metrics reads them.
    messages_by_partition: dict[int, int] = field(default_factory=dict)
    spans_by_partition: dict[int, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_messages: int = 0
    # With the repartition by trace id: the spans topic's messages it split, the pieces it
    # wrote, and the pieces that a replay of it wrote again, dropped here.
    repartitioned_messages: int = 0
    repartition_pieces: int = 0
    duplicate_pieces: int = 0


def partials_partition_of(agent: str, partitions: int) -> int:
    """Finalize is keyed by agent: every partial of one agent goes to the same partition."""
    return zlib.crc32(agent.encode()) % partitions


class AggregateRole:
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
        sampling: SamplingPolicy | None,
        send_partial: SendRecord,
        send_kept: SendRecord | None,
        send_dead_letter: SendDeadLetter,
        clock: Clock,
        repartitioned: bool = False,
        max_kept_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        """``send_kept`` None: nothing goes to Phoenix (forwarding off)."""
        self._window_size_ms = window_size_ms
        self._allowed_lateness_ms = allowed_lateness_ms
        self._idle_timeout_ms = idle_timeout_ms
        self._max_traces = max_traces
        # A trace is remembered (for children that come late) as long as a span may be late.
        self._trace_ttl_ms = max(allowed_lateness_ms, MIN_TRACE_TTL_MS)
        self._max_series = max_series_per_window
        self._partials_partitions = partials_partitions
        self._extraction = extraction
        self._sampling = sampling  # None: every span goes to Phoenix
        self._send_partial = send_partial
        self._send_kept = send_kept
        self._max_kept_record_bytes = max_kept_record_bytes
        self._send_dead_letter = send_dead_letter
        self._clock = clock
        self.partitions: dict[int, PartitionAggregator] = {}
        self._offsets = PartitionOffsets(log, "aggregate")
        # Reading the repartition topic: the repartition's pieces taken, per partition.
        self._repartitioned = repartitioned
        self._marks: dict[int, SourceMarks] = {}
        self.counters = AggregateCounters()

    @property
    def samples(self) -> bool:
        """Whether a sampler decides which spans go to Phoenix (else all of them do)."""
        return self._sampling is not None

    @property
    def hands_off_kept(self) -> bool:
        """Whether kept spans are written to the sampled topic (forwarding is on)."""
        return self._send_kept is not None

    def assign(self, partition: int, committed: int | None, metadata: str = "") -> None:
        """Take over ``partition`` at the group's committed offset (None: no commit yet),
        resuming from the checkpoint its commit carries."""
        if committed and not metadata:
            log.error(
                "aggregate partition %d was committed at %d without a checkpoint: windows "
                "open there may be resent incomplete",
                partition,
                committed,
            )
        checkpoint = Checkpoint.decode(committed or 0, metadata) if metadata else None
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
        self._marks[partition] = SourceMarks(checkpoint.sources if checkpoint else ())
        # The idle timeout counts from the assignment: a partition just taken over has not had
        # the chance to deliver anything yet.
        aggregator.watermark.touch(self._clock())
        self.partitions[partition] = aggregator
        self._offsets.assign(
            partition, committed, checkpoint.offset if checkpoint is not None else None
        )

    def next_offset(self, partition: int) -> int | None:
        """The offset after the last message handled (or the checkpoint's, before any)."""
        return self._offsets.next_offset(partition)

    def revoke_all(self) -> None:
        # Every rebalance restarts each partition at its committed offset, here or elsewhere:
        # the state is rebuilt from the checkpoint and the replay.
        self.partitions.clear()
        self._offsets.revoke_all()
        self._marks.clear()

    async def handle(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes],
    ) -> None:
        aggregator = self.partitions.get(partition)
        if aggregator is None or not self._offsets.accept(partition, offset):
            self.counters.skipped_messages += 1
            return
        with self._offsets.busy(partition, offset):
            await self._handle(aggregator, partition, offset, key, value, headers)

    async def _handle(
        self,
        aggregator: PartitionAggregator,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes],
    ) -> None:
        counters = self.counters
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
        await self._hand_off_kept(partition, aggregator)

    def _is_duplicate(self, partition: int, offset: int, headers: Mapping[str, bytes]) -> bool:
        tag = headers.get(SOURCE_HEADER)
        parsed = parse_source_tag(tag) if tag is not None else None
        if parsed is None:
            return False  # not from the repartition: nothing to compare with
        source_partition, mark = parsed
        return not self._marks[partition].take(offset, source_partition, mark)

    async def _hand_off_kept(self, partition: int, aggregator: PartitionAggregator) -> None:
        """Write the spans whose trace was just kept to the sampled topic, marked."""
        kept = aggregator.take_kept()
        if self._send_kept is None or not kept:
            return
        # Out of the aggregator, not yet in the producer: the commit waits for them.
        with self._offsets.busy(partition, min(item.offset for item in kept)):
            await self._write_kept(kept)

    async def _write_kept(self, kept: list[SampledSpan]) -> None:
        assert self._send_kept is not None
        spans = kept_spans_of(kept)
        records = kept_span_records(spans, max_record_bytes=self._max_kept_record_bytes)
        self.counters.kept_spans += len(spans)
        self.counters.kept_records += len(records)
        for key, value in records:
            await self._send_kept(key, value, None)

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

    async def tick(self, caught_up: Callable[[int], bool]) -> dict[int, Commit]:
        """Advance every partition's watermark, send what closed, return what to commit.

        A commit's offset has every span before it in a partial and, if kept, in a kept-span
        record, both handed to the producer; its metadata is the checkpoint to resume from.
        """
        now = self._clock()
        commits: dict[int, Commit] = {}
        for partition, aggregator in list(self.partitions.items()):
            result = aggregator.advance(now, caught_up=caught_up(partition))
            await self._emit(result)
            await self._hand_off_kept(partition, aggregator)
            next_offset = self._offsets.next_offset(partition)
            if next_offset is None or self.partitions.get(partition) is not aggregator:
                continue  # nothing read yet, or revoked while we were sending
            busy = self._offsets.busy_from(partition)
            if busy is not None and busy < next_offset:
                next_offset = busy  # a message handled or kept spans sent right now
            # The core owns the rest of the safe offset: open windows, traces that may still
            # change them, undecided traces (see PartitionAggregator.checkpoint).
            checkpoint = aggregator.checkpoint(next_offset)
            marks = self._marks.get(partition)
            if self._repartitioned and marks is not None:
                checkpoint = replace(checkpoint, sources=marks.as_of(checkpoint.offset))
                marks.forget_before(checkpoint.offset)
            commits[partition] = Commit(checkpoint.offset, checkpoint.encode())
        return commits

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
        # Every finalize partition must learn how far this source partition has got.
        key, value = progress.key(), progress.to_bytes()
        for target in range(self._partials_partitions):
            await self._send_partial(key, value, target)
