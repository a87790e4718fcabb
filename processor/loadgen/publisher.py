"""Publishing generated traces to Kafka: one message per trace, keyed by its trace id.

The only module of the load generator that does I/O. aiokafka errors are translated into
`StackError` here, with what to check.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from processor.errors import StackError
from processor.replication import min_insync_for, replication_for

CONTENT_TYPE_HEADER = ("content-type", b"application/x-protobuf")
# Deliveries awaited this far behind the newest send: far enough not to stall batching,
# near enough to notice a failed delivery soon.
_MAX_IN_FLIGHT = 2_000
_PROGRESS_REFRESH_S = 0.2


class PublishableTrace(Protocol):
    """What publishing needs from a trace; `GeneratedTrace` is one."""

    @property
    def trace_id_hex(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def span_count(self) -> int: ...
    @property
    def error_count(self) -> int: ...


TraceT = TypeVar("TraceT", bound=PublishableTrace)


@dataclass(frozen=True, slots=True)
class PublishStats:
    traces: int
    spans: int
    seconds: float
    error_spans: int = 0
    payload_bytes: int = 0

    @property
    def spans_per_second(self) -> float:
        return self.spans / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"published {self.traces:,} traces, {self.spans:,} spans "
            f"({self.payload_bytes / 1e6:,.1f} MB) in {self.seconds:,.2f} s: "
            f"{self.spans_per_second:,.0f} spans/s, {self.error_spans:,} error spans"
        )


async def ensure_topic(
    *, bootstrap: str, topic: str, partitions: int, security: Mapping[str, Any] | None = None
) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists; True if created.

    ``security``: aiokafka's TLS and SASL options (``kafka_security.aiokafka_security_options``).

    Brokers may have topic auto-creation off, and an auto-created topic would get the broker's
    default partition count rather than the one the benchmark asked for. Replicas follow
    `processor.replication`: 3 (2 in sync) on a cluster of three brokers or more.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="trace-processor-loadgen", **(security or {})
    )
    try:
        await admin.start()
        if topic in await admin.list_topics():
            return False
        cluster = await admin.describe_cluster()
        replication = replication_for(len(cluster.get("brokers", [])))
        # On the topic itself: a broker default above the replication factor (or of 1 on a
        # cluster) would refuse every write, or let one broker's loss lose acknowledged ones.
        config = {"min.insync.replicas": str(min_insync_for(replication))}
        response = await admin.create_topics(
            [NewTopic(topic, partitions, replication, topic_configs=config)]
        )
        for topic_error in response.topic_errors:
            error_code = topic_error[1]
            if error_code not in (0, TopicAlreadyExistsError.errno):
                raise StackError(f"Kafka refused to create topic {topic!r}: {for_code(error_code)}")
        return True
    except KafkaError as exc:
        raise StackError(_unreachable(bootstrap, exc)) from exc
    finally:
        await admin.close()


async def publish_traces(
    traces: Iterable[TraceT] | AsyncIterable[TraceT],
    *,
    bootstrap: str,
    security: Mapping[str, Any] | None = None,
    topic: str = "otlp_spans",
    partitions: int = 4,
    progress: bool = False,
    expected_traces: int | None = None,
    on_sent: Callable[[TraceT], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PublishStats:
    """Publish each trace as one message (key = trace id hex, value = OTLP protobuf).

    Creates the topic when it is missing. ``on_sent`` is called for each trace once the
    producer has accepted it; accepted traces are delivered before this returns, also when
    the caller is cancelled, so a caller counting truth in ``on_sent`` counts what reached
    Kafka (unless delivery itself fails: then this raises `StackError`). ``progress`` shows a
    rich progress bar (meant for a terminal); ``expected_traces`` sizes its bar.
    """
    await ensure_topic(bootstrap=bootstrap, topic=topic, partitions=partitions, security=security)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="trace-processor-loadgen",
        # Idempotence keeps a retried batch from being written twice, which would put the
        # truth file out by the duplicated spans.
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=1_048_576,
        max_request_size=8_388_608,
        **(security or {}),
    )
    traces_sent = spans_sent = error_spans = payload_bytes = 0
    in_flight: deque[asyncio.Future[object]] = deque()
    started = clock()
    display = _ProgressDisplay(expected_traces, clock) if progress else None
    try:
        await producer.start()
        async for trace in _as_async(traces):
            delivery = await producer.send(
                topic,
                value=trace.payload,
                key=trace.trace_id_hex.encode("ascii"),
                headers=[CONTENT_TYPE_HEADER],
            )
            in_flight.append(delivery)
            traces_sent += 1
            spans_sent += trace.span_count
            error_spans += trace.error_count
            payload_bytes += len(trace.payload)
            if on_sent is not None:
                on_sent(trace)
            while len(in_flight) > _MAX_IN_FLIGHT:
                # Surfaces a failed delivery while the run goes on, not only at the end.
                await in_flight.popleft()
            if display is not None:
                display.update(traces_sent, spans_sent)
        await asyncio.gather(*in_flight)
    except KafkaError as exc:
        raise StackError(_unreachable(bootstrap, exc)) from exc
    finally:
        try:
            # stop() flushes what was accepted, so an interrupted run still delivers it.
            await producer.stop()
        finally:
            if display is not None:
                display.update(traces_sent, spans_sent, force=True)
                display.stop()
    return PublishStats(
        traces=traces_sent,
        spans=spans_sent,
        seconds=clock() - started,
        error_spans=error_spans,
        payload_bytes=payload_bytes,
    )


class _ProgressDisplay:
    """A rich progress bar with spans/s, refreshed a few times a second."""

    def __init__(self, expected_traces: int | None, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._started = clock()
        self._last_refresh = 0.0
        self._progress = Progress(
            TextColumn("[bold]publishing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "traces  {task.fields[spans]:>12,} spans  {task.fields[rate]:>9,.0f} spans/s"
            ),
            TimeElapsedColumn(),
            console=Console(),
            transient=False,
        )
        self._task = self._progress.add_task("publish", total=expected_traces, spans=0, rate=0.0)
        self._progress.start()

    def update(self, traces: int, spans: int, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_refresh < _PROGRESS_REFRESH_S:
            return
        self._last_refresh = now
        elapsed = now - self._started
        rate = spans / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=traces, spans=spans, rate=rate)

    def stop(self) -> None:
        self._progress.stop()


async def _as_async(traces: Iterable[TraceT] | AsyncIterable[TraceT]) -> AsyncIterator[TraceT]:
    if isinstance(traces, AsyncIterable):
        async for trace in traces:
            yield trace
    else:
        for trace in traces:
            yield trace


def _unreachable(bootstrap: str, exc: Exception) -> str:
    return (
        f"could not publish to Kafka at {bootstrap}: {exc!r}; is the broker running "
        "(`trace-processor stack up`) and KAFKA_BOOTSTRAP_SERVERS / --bootstrap right?"
    )
