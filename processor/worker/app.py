"""The faust application: topics, the two stage agents, timers and partition hooks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import faust
import mode
import orjson
from faust.types import TP

from processor.clock import wall_clock_ms
from processor.core.partition import Checkpoint
from processor.core.semconv import ExtractionConfig
from processor.errors import ExportError
from processor.settings import WorkerSettings
from processor.sinks.mlflow_writer import RollupWriter
from processor.sinks.phoenix import ExportResult, PhoenixExporter, RetryPolicy
from processor.worker.assignment import AssignmentGate
from processor.worker.commits import CheckpointingTransport, CommitLedger, committed_metadata
from processor.worker.forwarding import ForwardedBatch, SpanForwarder
from processor.worker.observability import install_observability
from processor.worker.stage0 import Repartitioner
from processor.worker.stage1 import DeadLetter, Stage1
from processor.worker.stage2 import Stage2

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.5
MAX_DEAD_LETTER_BYTES = 512 * 1024


def _headers_of(raw: Any) -> dict[str, bytes]:
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {str(k).lower(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in items}


class ProcessorApp(faust.App):
    """A faust app whose commits carry the checkpoint of ``commit_ledger``."""

    commit_ledger: CommitLedger

    def _new_transport(self) -> Any:
        return CheckpointingTransport(self.conf.broker_consumer, self)


def create_app(settings: WorkerSettings, *, source_partitions: int | None = None) -> faust.App:
    """Build the worker's faust app; topics must exist (see ``processor.worker.topics``)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = ProcessorApp(
        settings.app_id,
        broker=[
            f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")
        ],
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        producer_acks=-1,
        producer_linger_ms=5,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # Messages read ahead of the stream (faust's default). 1024 kept the same spans/s with
        # ~16 MiB less at the peak; the rebalance failures it seemed to cause came from the
        # rewind that commits.seek_to_committed mends, and it was not measured again since.
        stream_buffer_maxsize=4096,
        # Per partition and fetch. Faust's default (1 MiB, ~50 of the usual messages) makes
        # the consumer thread hand records over in small batches, and every hand-over costs
        # the processing thread a wait for the GIL: 4 MiB gave ~1.3x the spans/s
        # (benchmarks/bench_worker.py) for ~16 MiB more per 4 partitions.
        consumer_max_fetch_size=4 << 20,
        # Events are acknowledged only once their data is safely out (see commits.py), so a
        # rebalance must not wait for every event read to be acknowledged.
        stream_wait_empty=False,
        datadir=str(settings.data_dir),
    )
    spans_topic = app.topic(
        settings.spans_topic,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.spans_partitions,
    )
    # Trace assembly reads the spans topic, or the repartition topic that stage 0 fills.
    stage1_topic = (
        app.topic(
            settings.stage1_topic,
            value_serializer="raw",
            key_serializer="raw",
            partitions=settings.spans_partitions,
        )
        if settings.repartition_by_trace_id
        else spans_topic
    )
    partials_topic = app.topic(
        settings.partials_topic,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.partials_partitions,
    )
    dead_letter_topic = app.topic(
        settings.dead_letter_topic, value_serializer="raw", key_serializer="raw"
    )

    async def send_partial(key: bytes, value: bytes, partition: int | None) -> None:
        await partials_topic.send(key=key, value=value, partition=partition)

    def dead_letter_sender(source_topic: str) -> Callable[[DeadLetter], Awaitable[None]]:
        async def send_dead_letter(letter: DeadLetter) -> None:
            headers = {
                "reason": letter.reason.encode(),
                "detail": letter.detail[:1000].encode(),
                "source.topic": source_topic.encode(),
                "source.partition": str(letter.source_partition).encode(),
                "source.offset": str(letter.source_offset).encode(),
            }
            value = letter.value
            if len(value) > MAX_DEAD_LETTER_BYTES:
                # Kafka would refuse it; the source.* headers point at the original message.
                headers["value.omitted_bytes"] = str(len(value)).encode()
                value = b""
            await dead_letter_topic.send(key=letter.key, value=value, headers=headers)

        return send_dead_letter

    async def phoenix_refused(batch: ForwardedBatch, result: ExportResult) -> None:
        # Phoenix refused the batch for good (a 4xx other than 408/429): keep it, with why.
        # Its offsets count as done once this returns, so wait for Kafka's acknowledgement.
        delivery = await dead_letter_topic.send(
            value=batch.to_request_bytes(),
            headers={
                "reason": b"phoenix_rejected",
                "detail": f"HTTP {result.status}: {result.detail}"[:1000].encode(),
                "phoenix.project": batch.project.encode(),
                "source.messages": ",".join(f"{p}:{o}" for p, o in batch.sources).encode(),
            },
        )
        await delivery

    sampling = settings.sampling_policy()
    forwarder = None
    if settings.phoenix_enabled:
        forwarder = SpanForwarder(
            PhoenixExporter(
                traces_url=settings.phoenix_traces_url,
                api_key=settings.phoenix_api_key,
                timeout_s=settings.phoenix_timeout_s,
                max_connections=settings.phoenix_max_in_flight + 2,
            ),
            default_project=settings.phoenix_project,
            on_failure=phoenix_refused,
            batch_spans=settings.phoenix_batch_spans,
            batch_interval_s=settings.phoenix_batch_interval_ms / 1000,
            max_in_flight=settings.phoenix_max_in_flight,
            retry=RetryPolicy(
                initial_s=settings.phoenix_retry_initial_ms / 1000,
                max_s=max(settings.phoenix_retry_max_ms, settings.phoenix_retry_initial_ms) / 1000,
            ),
            confirm_stored=settings.phoenix_confirm_stored,
            confirm_timeout_s=settings.phoenix_confirm_timeout_s,
        )
    stage1 = Stage1(
        window_size_ms=settings.window_size_ms,
        allowed_lateness_ms=settings.allowed_lateness_ms,
        idle_timeout_ms=settings.idle_timeout_ms,
        max_traces=settings.max_traces,
        max_series_per_window=settings.max_series_per_window,
        partials_partitions=settings.partials_partitions,
        extraction=ExtractionConfig(
            agent_attributes=tuple(settings.agent_attributes),
            dimension_attributes=tuple(settings.dimension_attributes),
        ),
        forwarder=forwarder,
        sampling=sampling,
        send_partial=send_partial,
        send_dead_letter=dead_letter_sender(settings.stage1_topic),
        clock=wall_clock_ms,
        repartitioned=settings.repartition_by_trace_id,
    )
    rollup_writer = RollupWriter(
        tracking_uri=settings.mlflow_tracking_uri,
        experiment_name=settings.mlflow_experiment_name,
        params={
            "window_size_ms": str(settings.window_size_ms),
            "allowed_lateness_ms": str(settings.allowed_lateness_ms),
            "sampling": sampling.summary() if sampling is not None else "all spans",
        },
        dimension_names=settings.dimension_attributes,
        phoenix_url=settings.phoenix_public_url or settings.phoenix_collector_endpoint,
    )
    stage2 = Stage2(
        source_partitions=source_partitions or settings.spans_partitions,
        max_wait_ms=settings.finalize_max_wait_ms,
        writer=rollup_writer,
        clock=wall_clock_ms,
    )
    ledger = app.commit_ledger = CommitLedger()
    app.stage1 = stage1  # type: ignore[attr-defined]
    app.stage2 = stage2  # type: ignore[attr-defined]
    install_observability(
        app,
        settings,
        stage1=stage1,
        stage2=stage2,
        forwarder=forwarder,
        ledger=ledger,
        writer=rollup_writer,
    )

    if settings.repartition_by_trace_id:

        async def send_piece(key: bytes, value: bytes, headers: dict[str, bytes]) -> None:
            # No partition: the producer's default partitioner hashes the trace-id key, as
            # for every keyed producer, so all pieces of a trace meet on one partition.
            await stage1_topic.send(key=key, value=value, headers=headers)

        repartitioner = Repartitioner(
            send_piece=send_piece,
            send_dead_letter=dead_letter_sender(settings.spans_topic),
            dead_letter_counters=stage1.counters,
        )
        app.stage0 = repartitioner  # type: ignore[attr-defined]

        @app.agent(spans_topic, name="stage0")
        async def stage0_agent(stream: Any) -> None:
            # Acknowledged as read: faust flushes the producer (the pieces) before it commits.
            async for event in stream.events():
                message = event.message
                await repartitioner.handle(
                    message.partition,
                    message.offset,
                    message.key,
                    message.value,
                    _headers_of(message.headers),
                )

    gate = AssignmentGate()

    async def set_up(tp: TP) -> None:
        # Wait while the partition is ours but its checkpoint not yet read (see assignment.py).
        if gate.is_open(tp):
            return
        try:
            assigned = tp in app.consumer.assignment()
        except Exception:  # consumer not started, or stopping: nothing to wait for
            return
        if assigned:
            await gate.wait(tp)

    @app.agent(stage1_topic, name="stage1")
    async def stage1_agent(stream: Any) -> None:  # faust.Stream; its stub lacks noack()
        async for event in stream.noack().events():
            message = event.message
            await set_up(message.tp)
            ledger.hold(message.tp, message.offset, event)
            value = message.value
            # The event stays held until its data is out; its payload need not.
            message.value = event.value = None
            await stage1.handle(
                message.partition,
                message.offset,
                message.key,
                value,
                _headers_of(message.headers),
            )

    @app.agent(partials_topic, name="stage2")
    async def stage2_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            message = event.message
            await set_up(message.tp)
            ledger.hold(message.tp, message.offset, event)
            value = message.value
            message.value = event.value = None
            stage2.handle(message.partition, message.offset, value or b"")

    def caught_up(partition: int) -> bool:
        # Caught up means stage 1 has *handled* everything up to the partition's end, not
        # merely that faust has fetched it: a busy worker's queued messages are not idle time.
        tp = TP(settings.stage1_topic, partition)
        try:
            highwater = app.consumer.highwater(tp)
        except Exception:  # not assigned (any more) or no fetch yet
            return False
        if highwater is None:
            return False
        handled = stage1.next_offset(partition)
        if handled is None:
            # Nothing handled since the assignment: then where the group's commit left it.
            consumer: Any = app.consumer  # faust keeps it, but not in its public API
            handled = consumer._committed_offset.get(tp) or 0
        return handled >= highwater

    @app.timer(TICK_INTERVAL_S)
    async def stage1_tick() -> None:
        for partition, checkpoint in (await stage1.tick(caught_up)).items():
            ledger.release(
                TP(settings.stage1_topic, partition), checkpoint.offset, checkpoint.encode()
            )

    # Separate from stage 1's timer: a slow MLflow must not hold back watermarks.
    @app.timer(TICK_INTERVAL_S)
    async def stage2_tick() -> None:
        for partition, (offset, finalized_until) in (await stage2.tick()).items():
            metadata = (
                "" if finalized_until is None else f'{{"finalized_until_ms":{finalized_until}}}'
            )
            ledger.release(TP(settings.partials_topic, partition), offset, metadata)

    @app.timer(settings.progress_log_interval_s)
    async def log_progress() -> None:
        counters = stage1.counters
        aggregators = list(stage1.partitions.values())
        log.info(
            "progress messages=%d spans=%d dead_letters=%d partials=%d windows_written=%d "
            "skipped=%d buffered_traces=%d sampler_spans=%d monotonic=%.3f",
            counters.messages,
            counters.spans,
            counters.dead_letters,
            counters.partials,
            stage2.windows_written,
            counters.skipped_messages,
            sum(aggregator.assembler.stats.traces for aggregator in aggregators),
            sum(a.sampler.stats.buffered_spans for a in aggregators if a.sampler is not None),
            time.monotonic(),
        )

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        # Every rebalance restarts all assigned partitions at their committed offsets.
        gate.close_all()
        ledger.forget(revoked)
        stage1.revoke_all()
        stage2.revoke_all()
        if forwarder is not None:
            forwarder.forget(tp.partition for tp in revoked if tp.topic == settings.stage1_topic)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: set[TP], **kwargs: Any) -> None:
        # Stage 0's partitions need no state: faust resumes them at the committed offset.
        ours = [
            tp for tp in assigned if tp.topic in (settings.stage1_topic, settings.partials_topic)
        ]
        committed = await committed_metadata(
            settings.kafka_bootstrap_servers, settings.app_id, ours
        )
        for tp in ours:
            offset, metadata = committed.get(tp, (0, ""))
            resumes_at = offset if tp in committed else None  # None: no commit yet
            if offset > 0 and not metadata:
                log.error(
                    "%s was committed at %d without a checkpoint: windows open there may be "
                    "resent incomplete",
                    tp,
                    offset,
                )
            if tp.topic == settings.stage1_topic:
                stage1.assign(
                    tp.partition,
                    Checkpoint.decode(offset, metadata) if metadata else None,
                    resumes_at,
                )
            else:
                stage2.assign(
                    tp.partition,
                    _finalized_until(metadata),
                    resumes_at,
                )
        gate.open(ours)

    @app.task
    async def announce() -> None:
        try:
            await asyncio.to_thread(rollup_writer.prepare)
        except ExportError as exc:  # not fatal: stage 2 retries when a window is due
            log.warning("MLflow not ready yet: %s", exc)
        log.info(
            "worker up: %s -> Phoenix %s, MLflow %s (window %d ms, lateness %d ms)",
            settings.spans_topic,
            settings.phoenix_traces_url if forwarder else "off",
            settings.mlflow_tracking_uri,
            settings.window_size_ms,
            settings.allowed_lateness_ms,
        )

    @app.service
    class ForwarderLifecycle(mode.Service):
        """Checks Phoenix access at start (a rejected key stops the worker, saying so) and
        sends the spans still held when the worker stops."""

        async def on_start(self) -> None:
            if forwarder is not None:
                await forwarder.start(check_access=True)

        async def on_stop(self) -> None:
            if forwarder is not None:
                await forwarder.drain(settings.phoenix_drain_timeout_s)

    return app


def _finalized_until(metadata: str) -> int | None:
    if not metadata:
        return None
    try:
        value = orjson.loads(metadata).get("finalized_until_ms")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def run_worker(settings: WorkerSettings, argv: Sequence[str] = ()) -> None:
    """Create topics, then run the faust worker until it is stopped."""
    from processor.worker.gc_tuning import tune_for_throughput
    from processor.worker.logging_setup import configure_logging
    from processor.worker.topics import ensure_topics

    logging_config = configure_logging(settings)
    counts = asyncio.run(ensure_topics(settings))
    app = create_app(settings, source_partitions=counts.get(settings.stage1_topic))
    # mode replaces the root logger's handlers when the worker starts: hand it ours.
    worker = faust.Worker(
        app, loglevel=settings.log_level.upper(), quiet=True, logging_config=logging_config
    )
    tune_for_throughput()
    worker.execute_from_commandline()
