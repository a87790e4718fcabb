"""An OpenTelemetry SDK span exporter that publishes OTLP protobuf to a Kafka topic.

    provider.add_span_processor(BatchSpanProcessor(KafkaSpanExporter(bootstrap_servers=...)))

What it writes: per trace, one ``ExportTraceServiceRequest`` (see ``encoding``), key = the trace
id in lowercase hex, header ``content-type: application/x-protobuf``: the messages the worker
reads, on the partition of their trace.

Threads. The SDK calls ``export`` from its BatchSpanProcessor thread; aiokafka runs on asyncio.
The exporter owns a private event loop in a daemon thread (started on first use) with one
idempotent producer; ``export`` hands the batch to it and waits, at most ``export_timeout_s``,
until Kafka has acknowledged every message. The agent's own threads never wait on Kafka: they
only append to the processor's bounded queue.

Failures. ``export`` never raises: a batch Kafka did not acknowledge in time, a span that alone
exceeds ``max_message_bytes``, a full buffer or an export after ``shutdown`` all come back as
``SpanExportResult.FAILURE``, with a logged warning and in ``stats``. A message that timed out
may still be delivered later: Kafka cannot take it back.

Bounded buffer. Bytes handed to the producer and not yet acknowledged (a slow or unreachable
broker leaves them in the producer until they expire) are capped at ``max_buffer_bytes``;
past it, an export fails at once instead of piling more on top.

Fork. A child process starts its own loop and producer on its first export; the parent's are
left untouched (their sockets belong to the parent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from opentelemetry import context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from processor.publishing.encoding import HEADERS, TraceMessage, encode_batch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Room for the record's key, headers and framing on top of the OTLP payload.
_RECORD_OVERHEAD_BYTES = 64 << 10
# How long past its own deadline ``export`` waits for the loop thread to answer at all.
_LOOP_GRACE_S = 2.0
# opentelemetry-api keeps this key private but stable; instrumentations check it so that an
# exporter's own I/O (aiokafka may be instrumented) does not produce spans of its own.
_SUPPRESS_INSTRUMENTATION_KEY = getattr(
    context, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation"
)


@dataclass(slots=True)
class ExporterStats:
    """Running totals since the exporter was made (per process)."""

    exported_spans: int = 0  # acknowledged by Kafka
    failed_spans: int = 0  # in an export that returned FAILURE
    messages: int = 0  # records acknowledged by Kafka


class KafkaSpanExporter(SpanExporter):
    """Publishes finished spans to ``topic`` as OTLP protobuf, one message per trace.

    ``producer_options`` go to ``aiokafka.AIOKafkaProducer`` as they are (TLS, SASL,
    ``compression_type``...) and override the exporter's own choices.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str = "otlp_spans",
        max_message_bytes: int = 1_000_000,
        max_buffer_bytes: int = 32 << 20,
        export_timeout_s: float = 10.0,
        client_id: str = "agent-trace-publisher",
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must name at least one host:port")
        if not topic:
            raise ValueError("topic must not be empty")
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
        if max_buffer_bytes < max_message_bytes:
            raise ValueError(
                f"max_buffer_bytes ({max_buffer_bytes}) must be >= max_message_bytes "
                f"({max_message_bytes})"
            )
        if not export_timeout_s > 0:
            raise ValueError(f"export_timeout_s must be > 0, got {export_timeout_s}")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.stats = ExporterStats()
        self._max_message_bytes = max_message_bytes
        self._max_buffer_bytes = max_buffer_bytes
        self._export_timeout_s = export_timeout_s
        self._producer_options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "client_id": client_id,
            # A retried batch must not be written twice: the worker would count its spans twice.
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 5,
            "max_request_size": max_message_bytes + _RECORD_OVERHEAD_BYTES,
            # Unacknowledged batches expire about when the export waiting for them gives up.
            "request_timeout_ms": max(1_000, int(export_timeout_s * 1000)),
            **(producer_options or {}),
        }
        self._lock = threading.Lock()
        self._runner: _ProducerLoop | None = None
        self._pending_bytes = 0
        self._shutdown = False
        # Loops abandoned by a fork: kept referenced so that the child never finalises them.
        self._orphans: list[_ProducerLoop] = []
        if hasattr(os, "register_at_fork"):
            reinit = weakref.WeakMethod(self._after_fork_in_child)

            def after_in_child() -> None:
                method = reinit()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=after_in_child)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            log.warning("KafkaSpanExporter is shut down: %d spans not published", len(spans))
            return self._failed(len(spans))
        try:
            batch = encode_batch(spans, max_message_bytes=self._max_message_bytes)
        except Exception:  # an encoding bug must not reach the agent; it is logged loudly
            log.exception("could not encode %d spans as OTLP", len(spans))
            return self._failed(len(spans))
        if batch.oversized_spans:
            log.warning(
                "%d spans are each larger than max_message_bytes=%d on their own: not published",
                batch.oversized_spans,
                self._max_message_bytes,
            )
        if not batch.messages:
            if batch.oversized_spans:
                return self._failed(batch.oversized_spans)
            return SpanExportResult.SUCCESS
        reservation = _Reservation(batch.value_bytes)
        with self._lock:
            pending = self._pending_bytes
            if pending and pending + reservation.size > self._max_buffer_bytes:
                runner = None
            else:
                self._pending_bytes += reservation.size
                runner = self._runner_locked()
        if runner is None:
            log.warning(
                "Kafka at %s has not acknowledged %d bytes yet (max_buffer_bytes=%d): "
                "%d spans not published",
                self.bootstrap_servers,
                pending,
                self._max_buffer_bytes,
                len(spans),
            )
            return self._failed(len(spans))
        timeout_s = self._export_timeout_s
        try:
            runner.run(
                partial(self._deliver, runner, batch.messages, reservation, timeout_s),
                timeout_s=timeout_s + _LOOP_GRACE_S,
            )
        except Exception as exc:
            self._abandon(reservation)
            log.warning(
                "could not publish %d spans to Kafka topic %r at %s: %s",
                batch.span_count,
                self.topic,
                self.bootstrap_servers,
                _describe(exc),
            )
            return self._failed(len(spans))
        with self._lock:
            self.stats.exported_spans += batch.span_count
            self.stats.messages += len(batch.messages)
        if batch.oversized_spans:
            return self._failed(batch.oversized_spans)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until everything handed to the producer is acknowledged; False on timeout.

        ``export`` already waits for its own batch, so this matters only after a timed-out
        export whose messages are still in the producer.
        """
        with self._lock:
            runner = self._runner
        if runner is None:
            return True
        timeout_s = max(0.0, timeout_millis / 1000)
        try:
            runner.run(partial(runner.flush, timeout_s), timeout_s=timeout_s + _LOOP_GRACE_S)
        except Exception as exc:
            log.warning("flushing the Kafka producer failed: %s", _describe(exc))
            return False
        with self._lock:
            return self._pending_bytes == 0

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        """Flush, close the producer and stop the loop thread; later exports fail."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close(max(0.0, timeout_millis / 1000))

    async def _deliver(
        self,
        runner: _ProducerLoop,
        messages: list[TraceMessage],
        reservation: _Reservation,
        timeout_s: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self._lock:
            if reservation.settled:
                raise TimeoutError("the export gave up before the producer loop got to it")
            reservation.started = True
        handed = 0  # bytes the producer holds now; released by their delivery callbacks
        try:
            deliveries: list[asyncio.Future[Any]] = []
            async with asyncio.timeout_at(deadline):
                producer = await runner.producer()
                for message in messages:
                    delivery = await producer.send(
                        self.topic, value=message.value, key=message.key, headers=list(HEADERS)
                    )
                    handed += len(message.value)
                    delivery.add_done_callback(partial(self._delivered, len(message.value)))
                    deliveries.append(delivery)
            # Not wait_for/gather: cancelling the producer's delivery futures is not ours to do.
            done, not_done = await asyncio.wait(
                deliveries, timeout=max(0.0, deadline - loop.time())
            )
            if not_done:
                raise TimeoutError(
                    f"{len(not_done)} of {len(deliveries)} messages not acknowledged "
                    f"within {timeout_s:g} s"
                )
            for delivery in done:
                delivery.result()
        finally:
            with self._lock:
                reservation.settled = True
                self._pending_bytes = max(0, self._pending_bytes - (reservation.size - handed))

    def _delivered(self, size: int, delivery: asyncio.Future[Any]) -> None:
        if not delivery.cancelled():
            delivery.exception()  # marks it retrieved: the export reports it, or gave up
        self._release(size)

    def _abandon(self, reservation: _Reservation) -> None:
        """Release a reservation whose delivery never started (a wedged or stopped loop)."""
        with self._lock:
            if not reservation.started and not reservation.settled:
                reservation.settled = True
                self._pending_bytes = max(0, self._pending_bytes - reservation.size)

    def _release(self, size: int) -> None:
        with self._lock:
            self._pending_bytes = max(0, self._pending_bytes - size)

    def _failed(self, span_count: int) -> SpanExportResult:
        with self._lock:
            self.stats.failed_spans += span_count
        return SpanExportResult.FAILURE

    def _runner_locked(self) -> _ProducerLoop:
        runner = self._runner
        if runner is None or not runner.alive:
            runner = self._runner = _ProducerLoop(self._new_producer)
        return runner

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(**self._producer_options)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._runner is not None:
            self._orphans.append(self._runner)
        self._runner = None
        self._pending_bytes = 0


@dataclass(slots=True)
class _Reservation:
    """Buffer bytes one export holds; settled exactly once, by the loop or by the export."""

    size: int
    started: bool = False
    settled: bool = False


class _ProducerLoop:
    """A private asyncio loop in a daemon thread, owning one aiokafka producer."""

    def __init__(self, make_producer: Callable[[], AIOKafkaProducer]) -> None:
        self._make_producer = make_producer
        self._producer: AIOKafkaProducer | None = None
        self._loop = asyncio.new_event_loop()
        self._starting: asyncio.Lock | None = None
        self._thread = threading.Thread(target=self._run, name="KafkaSpanExporter", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def run(self, make_coroutine: Callable[[], Coroutine[Any, Any, T]], *, timeout_s: float) -> T:
        """Run a coroutine on the loop and wait for its result, at most ``timeout_s``."""
        future = asyncio.run_coroutine_threadsafe(make_coroutine(), self._loop)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the Kafka producer did not answer within {timeout_s:g} s"
            ) from None

    async def producer(self) -> AIOKafkaProducer:
        """The started producer; a failed start is retried by the next caller."""
        if self._producer is not None:
            return self._producer
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._producer is None:
                producer = self._make_producer()
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
        return self._producer

    async def flush(self, timeout_s: float) -> None:
        if self._producer is not None:
            await asyncio.wait_for(self._producer.flush(), timeout_s)

    def close(self, timeout_s: float) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(partial(self._stop_producer, timeout_s), timeout_s=timeout_s + _LOOP_GRACE_S)
        except Exception as exc:
            log.warning("closing the Kafka producer failed: %s", _describe(exc))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s + _LOOP_GRACE_S)

    async def _stop_producer(self, timeout_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # stop() sends what the producer still holds, then closes the connections.
            await asyncio.wait_for(producer.stop(), timeout_s)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self._loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
