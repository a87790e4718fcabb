"""Forward kept spans to Phoenix in batches, without losing one and without unbounded memory.

``SpanForwarder`` is what the forward role talks to (the partition and offset are those of the
sampled topic):

- ``add(spans, partition=, offset=)`` buffers one Kafka message's kept spans in its project's
  batch (the resource's ``openinference.project.name``, else the default project). A batch is
  sent when it holds ``batch_spans`` spans, or ``batch_interval_s`` after its first span (by
  the timer task ``start()`` runs). At most ``max_in_flight`` requests are out at once; beyond
  that ``add`` waits (``saturated`` says so beforehand): the backpressure that pauses the
  forward role's reading while Phoenix is slow.
- ``pending_offset(partition)`` is the smallest offset of the partition with a span not yet
  settled. A span is settled when Phoenix has written it (not merely answered 2xx: see
  ``StoreConfirmer``; a batch accepted but not written, because Phoenix stopped with it in its
  queue, is sent again), or when Phoenix rejected its batch for good and ``on_failure`` (the
  dead-letter writer) returned. Offsets below it may be committed.
- A batch that fails for an environmental reason (connection, timeout, 408, 429, 5xx) is
  retried forever with ``RetryPolicy`` backoff, holding its in-flight slot, so its offsets never
  advance meanwhile. 401/403 (a rejected API key) is logged once as an ERROR (the key never is)
  and retried the same way: nothing is dropped, nothing advances, until the key is fixed.
- ``forget(partitions)`` on revocation drops the partitions' bookkeeping and their spans not
  yet sent; batches already out still complete. The next owner replays from the committed
  offset, and Phoenix ignores the span ids it already holds.
- ``flush()`` sends partial batches now, but only into free slots: it never waits for Phoenix.
- ``drain(timeout_s)`` at shutdown sends the partial batches and waits for the requests out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.spans import SpanOrigin
from processor.errors import ConfigurationError
from processor.sinks.otlp_batch import build_request
from processor.sinks.phoenix import (
    PROJECT_HEADER,
    EncodedBatch,
    ExportOutcome,
    ExportResult,
    PhoenixExporter,
    RetryPolicy,
    StoreConfirmer,
    StoreVerdict,
)

log = logging.getLogger(__name__)

SpanItem = tuple[SpanOrigin, Span]
WARN_EVERY_S = 60.0


@dataclass(slots=True, eq=False)
class _Message:
    """One source message's spans that are not settled yet."""

    partition: int
    offset: int
    remaining: int


@dataclass(slots=True)
class _Buffer:
    opened_at: float
    size: int = 0
    segments: list[tuple[_Message, list[SpanItem]]] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class ForwardedBatch:
    """One request's worth of spans: what ``on_failure`` receives for a rejected batch.

    ``sources`` lists the (partition, offset) of the Kafka messages the spans came from.
    """

    project: str
    items: list[SpanItem]
    sources: tuple[tuple[int, int], ...]
    shares: tuple[tuple[_Message, int], ...] = field(repr=False, compare=False)
    """How many of the spans each source message contributed (internal bookkeeping)."""

    def to_request_bytes(self) -> bytes:
        """The batch as an uncompressed OTLP protobuf export request (the DLQ format)."""
        return build_request(self.items).SerializeToString()


FailureHandler = Callable[[ForwardedBatch, ExportResult], Awaitable[None]]


@dataclass(slots=True)
class ForwarderStats:
    accepted_spans: int = 0
    accepted_batches: int = 0
    dead_lettered_spans: int = 0
    dead_lettered_batches: int = 0
    retried_attempts: int = 0
    retries_by_status: dict[str, int] = field(default_factory=dict)
    resent_batches: int = 0  # accepted, then not found written: sent again
    dropped_on_revoke_spans: int = 0
    unauthorized: bool = False  # the last answer was 401/403 and no batch got through since


class SpanForwarder:
    def __init__(
        self,
        exporter: PhoenixExporter,
        *,
        default_project: str,
        on_failure: FailureHandler,
        batch_spans: int = 2_000,
        batch_interval_s: float = 1.0,
        max_in_flight: int = 4,
        retry: RetryPolicy | None = None,
        confirm_stored: bool = True,
        confirm_timeout_s: float = 120.0,
        confirm_interval_s: float = 0.2,
        overtake_grace_s: float = 10.0,
        max_unconfirmed_resends: int = 3,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not default_project or not _fits_header(default_project):
            raise ValueError(
                f"default_project must be printable ASCII (it is sent as the {PROJECT_HEADER} "
                f"header), got {default_project!r}"
            )
        if batch_spans < 1:
            raise ValueError(f"batch_spans must be at least 1, got {batch_spans}")
        if not batch_interval_s > 0:
            raise ValueError(f"batch_interval_s must be > 0, got {batch_interval_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not confirm_timeout_s > 0:
            raise ValueError(f"confirm_timeout_s must be > 0, got {confirm_timeout_s}")
        if max_unconfirmed_resends < 0:
            raise ValueError(f"max_unconfirmed_resends must be >= 0, got {max_unconfirmed_resends}")
        self._exporter = exporter
        self._confirmer = (
            StoreConfirmer(
                exporter,
                interval_s=confirm_interval_s,
                stall_timeout_s=confirm_timeout_s,
                overtake_grace_s=overtake_grace_s,
                clock=clock,
            )
            if confirm_stored
            else None
        )
        self._confirm_timeout_s = confirm_timeout_s
        self._max_unconfirmed_resends = max_unconfirmed_resends
        self._default_project = default_project
        self._on_failure = on_failure
        self._batch_spans = batch_spans
        self._batch_interval_s = batch_interval_s
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._buffers: dict[str, _Buffer] = {}
        # partition -> offset -> message, in offset order (first key = smallest pending offset)
        self._pending: dict[int, dict[int, _Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._warned_at: float | None = None
        self._closed = False  # draining: add() only tracks
        self._stopped = False  # drained: nothing is sent any more
        self._crash: BaseException | None = None
        self._told_unsupported = False
        self.stats = ForwarderStats()

    # -- the forward role's side ------------------------------------------------------------------

    async def start(self, *, check_access: bool = True) -> None:
        """Start the batch timer. With ``check_access``, first send Phoenix an empty request:
        a rejected API key raises ``ConfigurationError`` (the worker should not start); an
        unreachable Phoenix only logs a warning, since spans are held and retried anyway."""
        if check_access:
            result = await self._exporter.probe()
            if result.outcome is ExportOutcome.UNAUTHORIZED:
                raise ConfigurationError(self._auth_message(result))
            if not result.ok:
                log.warning(
                    "Phoenix at %s is not accepting spans yet (%s); spans are held and retried",
                    self._exporter.traces_url,
                    _describe(result),
                )
        if self._timer is None:
            self._timer = asyncio.create_task(self._run_timer(), name="phoenix-batch-timer")

    async def add(self, spans: Sequence[SpanItem], *, partition: int, offset: int) -> None:
        """Buffer one message's kept spans (each with its origin); sends full batches,
        waiting for a free slot."""
        if self._crash is not None:
            raise RuntimeError("a Phoenix export task crashed") from self._crash
        if not spans:
            return
        message = self._track(partition, offset, len(spans))
        if self._closed:
            # Draining: the spans are not sent, but tracked, so their offset is not committed.
            return
        by_project: dict[str, list[SpanItem]] = {}
        for item in spans:
            by_project.setdefault(self._project_of(item[0]), []).append(item)
        for project, items in by_project.items():
            start = 0
            while start < len(items):
                buffer = self._buffers.get(project)
                if buffer is None:
                    buffer = self._buffers[project] = _Buffer(opened_at=self._clock())
                    self._opened.set()
                room = self._batch_spans - buffer.size
                chunk = items[start : start + room]
                buffer.segments.append((message, chunk))
                buffer.size += len(chunk)
                start += len(chunk)
                if buffer.size >= self._batch_spans:
                    await self._dispatch(project, lambda b: b.size >= self._batch_spans)

    def pending_offset(self, partition: int) -> int | None:
        """Smallest offset of ``partition`` with a span buffered, in flight or not yet written
        by Phoenix; None if there is none. Offsets below it are safe to commit."""
        messages = self._pending.get(partition)
        return next(iter(messages)) if messages else None

    async def flush(self) -> None:
        """Send the partial batches for which a request slot is free now.

        Never waits for Phoenix: while every slot is taken, the rest stays buffered for the
        next flush, the timer or a full batch. So a caller's periodic tick never stalls."""
        for project in list(self._buffers):
            if self._slots.locked():
                return
            await self._dispatch(project, _has_spans)

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the bookkeeping of revoked partitions, and their spans not sent yet."""
        revoked = set(partitions)
        for partition in revoked:
            self._pending.pop(partition, None)
        for project, buffer in list(self._buffers.items()):
            kept = [seg for seg in buffer.segments if seg[0].partition not in revoked]
            if len(kept) == len(buffer.segments):
                continue
            dropped = buffer.size - sum(len(items) for _, items in kept)
            self.stats.dropped_on_revoke_spans += dropped
            buffer.segments = kept
            buffer.size -= dropped
            if not buffer.size:
                del self._buffers[project]

    async def drain(self, timeout_s: float) -> int:
        """Send what is buffered and wait up to ``timeout_s`` for every request out; then
        give up on the rest (their offsets stay uncommitted and are replayed) and close.
        Returns the number of spans not delivered."""
        self._closed = True
        deadline = self._clock() + timeout_s
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._send_all(), timeout=max(0.0, deadline - self._clock()))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - self._clock()))
        # Before the cancellations free slots: an add() waiting for one must not send any more
        # (its request would meet a closed client).
        self._stopped = True
        while self._tasks:
            cancelled = set(self._tasks)
            for task in cancelled:
                task.cancel()
            await asyncio.gather(*cancelled, return_exceptions=True)
            self._tasks -= cancelled
        undelivered = self.pending_spans()
        if undelivered:
            log.warning(
                "Phoenix drain gave up after %.0f s with %d spans undelivered; their offsets "
                "are not committed, so they are sent again after a restart",
                timeout_s,
                undelivered,
            )
        if self._confirmer is not None:
            await self._confirmer.close()
        await self._exporter.shutdown()
        return undelivered

    # -- introspection ---------------------------------------------------------------------

    def pending_spans(self) -> int:
        """Spans added and not settled, over every tracked partition."""
        return sum(m.remaining for messages in self._pending.values() for m in messages.values())

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def saturated(self) -> bool:
        """Whether every request slot is taken: a full batch added now would wait."""
        return self._slots.locked()

    # -- inside ----------------------------------------------------------------------------

    def _project_of(self, origin: SpanOrigin) -> str:
        project = origin.project
        return project if project else self._default_project

    def _track(self, partition: int, offset: int, count: int) -> _Message:
        messages = self._pending.setdefault(partition, {})
        message = messages.get(offset)
        if message is not None:  # the same message again (redelivered): one more share
            message.remaining += count
            return message
        last = next(reversed(messages), None)
        message = messages[offset] = _Message(partition, offset, count)
        if last is not None and last > offset:  # out of order (a replay): keep the dict sorted
            self._pending[partition] = dict(sorted(messages.items()))
        return message

    async def _send_all(self) -> None:
        for project in list(self._buffers):
            await self._dispatch(project, _has_spans)

    async def _dispatch(self, project: str, ready: Callable[[_Buffer], bool]) -> None:
        # The slot is taken before the buffer is popped: while waiting, the buffer keeps
        # filling (never beyond batch_spans) and the timer cannot send it twice.
        await self._slots.acquire()
        buffer = self._buffers.get(project)
        if self._stopped or buffer is None or not ready(buffer):
            self._slots.release()
            return
        del self._buffers[project]
        counts: dict[_Message, int] = {}
        items: list[SpanItem] = []
        for message, chunk in buffer.segments:
            counts[message] = counts.get(message, 0) + len(chunk)
            items.extend(chunk)
        batch = ForwardedBatch(
            project=project,
            items=items,
            sources=tuple(sorted({(m.partition, m.offset) for m in counts})),
            shares=tuple(counts.items()),
        )
        task = asyncio.create_task(self._deliver(batch), name=f"phoenix-export-{project}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug, not a Phoenix failure: its spans would stay pending forever. Say so, and
            # make the next add() raise so the worker stops instead of stalling quietly.
            log.error("a Phoenix export task crashed", exc_info=error)
            self._crash = error

    async def _deliver(self, batch: ForwardedBatch) -> None:
        try:
            encoded = await self._exporter.encode_batch(batch.items)
            header = batch.project if _fits_header(batch.project) else None
            attempt = unwritten = 0
            while True:
                attempt += 1
                result = await self._exporter.send(encoded.body, project=header)
                if result.outcome is ExportOutcome.ACCEPTED:
                    verdict = await self._confirm(encoded)
                    if verdict in (StoreVerdict.STORED, StoreVerdict.UNSUPPORTED):
                        self._accepted(batch)
                        return
                    # A Phoenix that lost its queue or is stuck says nothing against the
                    # batch; one that writes later spans but never this batch's, again and
                    # again, does.
                    unwritten += verdict is StoreVerdict.OVERTAKEN
                    if unwritten > self._max_unconfirmed_resends:
                        await self._dead_letter(batch, self._never_stored(encoded, unwritten))
                        return
                    self._resend(batch, encoded, verdict)
                    attempt = 0
                    continue
                if result.outcome is ExportOutcome.REJECTED:
                    await self._dead_letter(batch, result)
                    return
                self._note_failure(result)
                await asyncio.sleep(
                    self._retry.delay_s(attempt, result.retry_after_s, rng=self._rng)
                )
        finally:
            self._slots.release()

    async def _confirm(self, encoded: EncodedBatch) -> StoreVerdict:
        if self._confirmer is None:
            return StoreVerdict.UNSUPPORTED
        verdict = await self._confirmer.wait(encoded.last_span_id, encoded.first_span_id)
        if verdict is StoreVerdict.UNSUPPORTED and not self._told_unsupported:
            self._told_unsupported = True
            log.error(
                "Phoenix at %s cannot tell which spans it has written (%s); offsets now advance "
                "when Phoenix answers 2xx, so spans still in its queue are lost if it stops. "
                "Set PROCESSOR_PHOENIX_CONFIRM_STORED=false to silence this",
                self._exporter.graphql_url,
                self._confirmer.unsupported,
            )
        return verdict

    def _resend(self, batch: ForwardedBatch, encoded: EncodedBatch, verdict: StoreVerdict) -> None:
        self.stats.resent_batches += 1
        why = {
            StoreVerdict.LOST: "Phoenix went away while they were in its queue",
            StoreVerdict.OVERTAKEN: "spans accepted after them are written and they are not",
            StoreVerdict.STALLED: (
                f"Phoenix wrote none of the spans waited for in {self._confirm_timeout_s:.0f} s"
            ),
        }[verdict]
        log.warning(
            "Phoenix accepted %d spans of project %r but %s (span %s is missing); sending them "
            "again, Phoenix ignores those it already has",
            len(batch.items),
            batch.project,
            why,
            encoded.last_span_id,
        )

    def _never_stored(self, encoded: EncodedBatch, times: int) -> ExportResult:
        return ExportResult(
            ExportOutcome.REJECTED,
            None,
            f"Phoenix accepted the batch {times} times but never wrote its span "
            f"{encoded.last_span_id}",
        )

    def _accepted(self, batch: ForwardedBatch) -> None:
        self.stats.accepted_spans += len(batch.items)
        self.stats.accepted_batches += 1
        failing_since, warned_at = self._failing_since, self._warned_at
        if failing_since is not None and warned_at is not None and warned_at >= failing_since:
            log.info(
                "Phoenix at %s accepts spans again after %.0f s",
                self._exporter.traces_url,
                self._clock() - failing_since,
            )
        self._failing_since = None
        self.stats.unauthorized = False
        self._settle(batch)

    async def _dead_letter(self, batch: ForwardedBatch, result: ExportResult) -> None:
        log.error(
            "Phoenix refused %d spans of project %r for good (%s); sending them to the "
            "dead-letter topic",
            len(batch.items),
            batch.project,
            _describe(result),
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._on_failure(batch, result)
                break
            except Exception:
                # Not settled until the dead letter is written: the offsets must not pass it.
                log.exception("could not dead-letter a batch refused by Phoenix; retrying")
                await asyncio.sleep(self._retry.delay_s(attempt, rng=self._rng))
        self.stats.dead_lettered_spans += len(batch.items)
        self.stats.dead_lettered_batches += 1
        self._settle(batch)

    def _note_failure(self, result: ExportResult) -> None:
        self.stats.retried_attempts += 1
        key = str(result.status) if result.status is not None else "connection"
        self.stats.retries_by_status[key] = self.stats.retries_by_status.get(key, 0) + 1
        if result.outcome is ExportOutcome.UNAUTHORIZED:
            if not self.stats.unauthorized:
                self.stats.unauthorized = True
                self._warned_at = self._clock()
                log.error("%s", self._auth_message(result))
        elif self._warned_at is None or self._clock() - self._warned_at >= WARN_EVERY_S:
            # Under sustained overload 503s and successes alternate: one line a minute.
            self._warned_at = self._clock()
            log.warning(
                "Phoenix at %s is not accepting spans (%s; %d retries so far); holding them "
                "and retrying with backoff, consumption pauses once %d requests wait",
                self._exporter.traces_url,
                _describe(result),
                self.stats.retried_attempts,
                self._max_in_flight,
            )
        if self._failing_since is None:
            self._failing_since = self._clock()

    def _auth_message(self, result: ExportResult) -> str:
        which = "the PHOENIX_API_KEY given" if self._exporter.has_api_key else "no API key"
        return (
            f"Phoenix at {self._exporter.traces_url} refused {which} (HTTP {result.status}: "
            f"{result.detail or 'no detail'}); set PHOENIX_API_KEY to a valid Phoenix API key. "
            "Spans are held and retried, and their offsets are not committed, until it is fixed"
        )

    def _settle(self, batch: ForwardedBatch) -> None:
        for message, count in batch.shares:
            message.remaining -= count
            if message.remaining > 0:
                continue
            messages = self._pending.get(message.partition)
            # After forget() (and a replay) the dict may hold another message for this offset.
            if messages is not None and messages.get(message.offset) is message:
                del messages[message.offset]
                if not messages:
                    del self._pending[message.partition]

    async def _run_timer(self) -> None:
        while True:
            self._opened.clear()
            if not self._buffers:
                await self._opened.wait()
                continue
            oldest = min(buffer.opened_at for buffer in self._buffers.values())
            wait_s = oldest + self._batch_interval_s - self._clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                continue
            for project, buffer in list(self._buffers.items()):
                if self._clock() - buffer.opened_at >= self._batch_interval_s:
                    await self._dispatch(project, self._is_due)

    def _is_due(self, buffer: _Buffer) -> bool:
        return buffer.size > 0 and self._clock() - buffer.opened_at >= self._batch_interval_s


def _has_spans(buffer: _Buffer) -> bool:
    return buffer.size > 0


def _fits_header(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _describe(result: ExportResult) -> str:
    status = f"HTTP {result.status}" if result.status is not None else "no answer"
    return f"{status}: {result.detail}" if result.detail else status
