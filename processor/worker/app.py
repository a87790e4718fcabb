"""The worker: faust topics, agents and timers for the aggregate and finalize roles, the forward
role's consumer, and the wiring of the roles to the sinks.

The roles' rules (what to commit, when) live in their own modules; this one only connects
them to Kafka. ``--roles`` picks which run here: aggregate (with the repartition) and finalize
share the faust app's consumer group, forward has a group of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
import mode
from faust.exceptions import NotReady
from faust.types import TP

from processor.clock import wall_clock_ms
from processor.core.semconv import ExtractionConfig
from processor.errors import ExportError
from processor.kafka_security import faust_credentials
from processor.settings import WorkerSettings
from processor.sinks.alert_webhook import AlertWebhook
from processor.sinks.mlflow_writer import RollupWriter
from processor.sinks.phoenix import PhoenixExporter, RetryPolicy
from processor.worker.aggregate import AggregateRole, DeadLetter
from processor.worker.alert_notifier import AlertNotifier
from processor.worker.alerting import Alerting
from processor.worker.assignment import AssignmentGate
from processor.worker.commits import CheckpointingTransport, CommitLedger, committed_metadata
from processor.worker.finalize import FinalizeRole
from processor.worker.forward import ForwardRole
from processor.worker.forward_consumer import ForwardConsumer, RefusedBatches
from processor.worker.observability import ObservabilityService, install_observability
from processor.worker.offsets import Commit
from processor.worker.phoenix_delivery import SpanForwarder
from processor.worker.repartition import Repartitioner
from processor.worker.summaries import read_summaries

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


def build_forwarder(settings: WorkerSettings, refused: RefusedBatches) -> SpanForwarder:
    return SpanForwarder(
        PhoenixExporter(
            traces_url=settings.phoenix_traces_url,
            api_key=settings.phoenix_api_key,
            timeout_s=settings.phoenix_timeout_s,
            max_connections=settings.phoenix_max_in_flight + 2,
        ),
        default_project=settings.phoenix_project,
        on_failure=refused,
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


def build_forward_consumer(settings: WorkerSettings) -> ForwardConsumer:
    """The forward role with its own consumer of the sampled topic."""
    refused = RefusedBatches(settings)
    return ForwardConsumer(settings, ForwardRole(build_forwarder(settings, refused)), refused)


def create_app(settings: WorkerSettings, *, source_partitions: int | None = None) -> faust.App:
    """Build the worker's faust app for its roles; topics must exist (``worker.topics``).

    With the forward role among them, its consumer runs as a service of the app."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = ProcessorApp(
        settings.app_id,
        broker=[
            f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")
        ],
        broker_credentials=faust_credentials(settings),
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
    # Trace assembly reads the spans topic, or the repartition topic that the repartition fills.
    aggregate_topic = (
        app.topic(
            settings.aggregate_topic,
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
    summaries_topic = app.topic(
        settings.summaries_topic,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.partials_partitions,
    )
    dead_letter_topic = app.topic(
        settings.dead_letter_topic, value_serializer="raw", key_serializer="raw"
    )
    alerts_topic = app.topic(settings.alerts_topic, value_serializer="raw", key_serializer="raw")

    sampled_topic = app.topic(
        settings.sampled_topic,
        value_serializer="raw",
        key_serializer="raw",
        partitions=settings.sampled_partitions,
    )

    async def send_partial(key: bytes, value: bytes, partition: int | None) -> None:
        await partials_topic.send(key=key, value=value, partition=partition)

    async def send_summary(key: bytes, value: bytes | None, partition: int) -> None:
        await summaries_topic.send(key=key, value=value, partition=partition)

    async def send_alert(key: bytes, value: bytes) -> None:
        await alerts_topic.send(key=key, value=value)

    async def send_kept(key: bytes, value: bytes, partition: int | None) -> None:
        # No partition: the default partitioner hashes the trace id, so a trace stays together.
        await sampled_topic.send(key=key, value=value, partition=partition)

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

    roles = set(settings.roles)
    sampling = settings.sampling_policy()
    aggregate = AggregateRole(
        window_size_ms=settings.window_size_ms,
        allowed_lateness_ms=settings.allowed_lateness_ms,
        idle_timeout_ms=settings.idle_timeout_ms,
        max_traces=settings.max_traces,
        max_series_per_window=settings.max_series_per_window,
        partials_partitions=settings.partials_partitions,
        extraction=ExtractionConfig(
            agent_attributes=tuple(settings.agent_attributes),
            dimension_attributes=tuple(settings.dimension_attributes),
            prices=settings.price_table,
            model_dimension=settings.rollup_by_model,
        ),
        sampling=sampling,
        send_partial=send_partial,
        send_kept=send_kept if settings.phoenix_enabled else None,
        send_dead_letter=dead_letter_sender(settings.aggregate_topic),
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
        dimension_names=settings.rollup_dimension_names,
        phoenix_url=settings.phoenix_public_url or settings.phoenix_collector_endpoint,
    )
    webhook = (
        AlertWebhook(settings.alert_webhook_url, body_format=settings.alert_webhook_format)
        if settings.alert_webhook_url and settings.alert_rules
        else None
    )
    alerting = (
        Alerting(
            rules=settings.alert_rules,
            dimension_names=settings.rollup_dimension_names,
            send=send_alert,
            webhook=webhook,
            link=rollup_writer.trace_link,
        )
        if settings.alert_rules
        else None
    )
    finalize = FinalizeRole(
        source_partitions=source_partitions or settings.spans_partitions,
        max_wait_ms=settings.finalize_max_wait_ms,
        writer=rollup_writer,
        clock=wall_clock_ms,
        send_summary=send_summary,
        alerting=alerting,
    )
    forward = (
        build_forward_consumer(settings)
        if "forward" in roles and settings.phoenix_enabled
        else None
    )
    ledger = app.commit_ledger = CommitLedger()
    install_observability(
        app,
        settings,
        aggregate=aggregate if "aggregate" in roles else None,
        finalize=finalize if "finalize" in roles else None,
        forward=forward,
        ledger=ledger,
        writer=rollup_writer if "finalize" in roles else None,
    )
    if forward is not None:
        app.add_dependency(forward)
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

    if "aggregate" in roles:
        _aggregate_agents(app, settings, aggregate, aggregate_topic, set_up, ledger)
        if settings.repartition_by_trace_id:
            _repartition_agent(
                app, settings, aggregate, aggregate_topic, spans_topic, dead_letter_sender
            )
    if "finalize" in roles:
        _finalize_agents(app, settings, finalize, partials_topic, set_up, ledger)
        if webhook is not None:
            app.add_dependency(AlertNotifier(settings, webhook))

    @app.timer(settings.progress_log_interval_s)
    async def log_progress() -> None:
        counters = aggregate.counters
        aggregators = list(aggregate.partitions.values())
        forwarded = forward.role.counters if forward is not None else None
        log.info(
            "progress messages=%d spans=%d dead_letters=%d partials=%d kept_spans=%d "
            "windows_written=%d skipped=%d forwarded_spans=%d buffered_traces=%d "
            "sampler_spans=%d monotonic=%.3f",
            counters.messages,
            counters.spans,
            counters.dead_letters,
            counters.partials,
            counters.kept_spans,
            finalize.windows_written,
            counters.skipped_messages,
            forwarded.spans if forwarded is not None else 0,
            # the benchmarks read these last three as the line ends: keep them there
            sum(aggregator.assembler.stats.traces for aggregator in aggregators),
            sum(a.sampler.stats.buffered_spans for a in aggregators if a.sampler is not None),
            time.monotonic(),
        )

    ours = {settings.aggregate_topic, settings.partials_topic}

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        # Every rebalance restarts all assigned partitions at their committed offsets.
        gate.close_all()
        ledger.forget(revoked)
        aggregate.revoke_all()
        finalize.revoke_all()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: set[TP], **kwargs: Any) -> None:
        # The repartition's partitions need no state: faust resumes them at the commit.
        taken = [tp for tp in assigned if tp.topic in ours]
        committed = await committed_metadata(settings, settings.app_id, taken)
        finalized = [tp.partition for tp in taken if tp.topic == settings.partials_topic]
        summaries = await read_summaries(settings, settings.summaries_topic, finalized)
        for tp in taken:
            offset, metadata = committed.get(tp, (None, ""))
            if tp.topic == settings.aggregate_topic:
                aggregate.assign(tp.partition, offset, metadata)
            else:
                finalize.assign(tp.partition, offset, metadata, summaries.get(tp.partition, ()))
        gate.open(taken)

    @app.task
    async def announce() -> None:
        if "finalize" in roles:
            try:
                await asyncio.to_thread(rollup_writer.prepare)
            except ExportError as exc:  # not fatal: finalize retries when a window is due
                log.warning("MLflow not ready yet: %s", exc)
        log.info(
            "worker up, roles %s: %s -> Phoenix %s, MLflow %s (window %d ms, lateness %d ms)",
            ",".join(settings.roles),
            settings.spans_topic,
            settings.phoenix_traces_url if settings.phoenix_enabled else "off",
            settings.mlflow_tracking_uri,
            settings.window_size_ms,
            settings.allowed_lateness_ms,
        )

    return app


def _aggregate_agents(
    app: faust.App,
    settings: WorkerSettings,
    aggregate: AggregateRole,
    aggregate_topic: Any,
    set_up: Callable[[TP], Awaitable[None]],
    ledger: CommitLedger,
) -> None:
    @app.agent(aggregate_topic, name="aggregate")
    async def aggregate_agent(stream: Any) -> None:  # faust.Stream; its stub lacks noack()
        async for event in stream.noack().events():
            message = event.message
            await set_up(message.tp)
            ledger.hold(message.tp, message.offset, event)
            value = message.value
            # The event stays held until its data is out; its payload need not.
            message.value = event.value = None
            await aggregate.handle(
                message.partition,
                message.offset,
                message.key,
                value,
                _headers_of(message.headers),
            )

    def caught_up(partition: int) -> bool:
        # Caught up means aggregate has *handled* everything up to the partition's end, not
        # merely that faust has fetched it: a busy worker's queued messages are not idle time.
        tp = TP(settings.aggregate_topic, partition)
        try:
            highwater = app.consumer.highwater(tp)
        except Exception:  # not assigned (any more) or no fetch yet
            return False
        if highwater is None:
            return False
        handled = aggregate.next_offset(partition)
        if handled is None:
            # Nothing handled since the assignment: then where the group's commit left it.
            consumer: Any = app.consumer  # faust keeps it, but not in its public API
            handled = consumer._committed_offset.get(tp) or 0
        return handled >= highwater

    @app.timer(TICK_INTERVAL_S)
    async def aggregate_tick() -> None:
        for partition, commit in (await _tick(app, lambda: aggregate.tick(caught_up))).items():
            ledger.release(TP(settings.aggregate_topic, partition), commit.offset, commit.metadata)


def _repartition_agent(
    app: faust.App,
    settings: WorkerSettings,
    aggregate: AggregateRole,
    aggregate_topic: Any,
    spans_topic: Any,
    dead_letter_sender: Callable[[str], Callable[[DeadLetter], Awaitable[None]]],
) -> None:
    async def send_piece(key: bytes, value: bytes, headers: dict[str, bytes]) -> None:
        # No partition: the producer's default partitioner hashes the trace-id key, as
        # for every keyed producer, so all pieces of a trace meet on one partition.
        await aggregate_topic.send(key=key, value=value, headers=headers)

    repartitioner = Repartitioner(
        send_piece=send_piece,
        send_dead_letter=dead_letter_sender(settings.spans_topic),
        counters=aggregate.counters,
    )
    app.repartitioner = repartitioner  # type: ignore[attr-defined]

    @app.agent(spans_topic, name="repartition")
    async def repartition_agent(stream: Any) -> None:
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


def _finalize_agents(
    app: faust.App,
    settings: WorkerSettings,
    finalize: FinalizeRole,
    partials_topic: Any,
    set_up: Callable[[TP], Awaitable[None]],
    ledger: CommitLedger,
) -> None:
    @app.agent(partials_topic, name="finalize")
    async def finalize_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            message = event.message
            await set_up(message.tp)
            ledger.hold(message.tp, message.offset, event)
            value = message.value
            message.value = event.value = None
            finalize.handle(message.partition, message.offset, value or b"")

    # Separate from aggregate's timer: a slow MLflow must not hold back watermarks.
    @app.timer(TICK_INTERVAL_S)
    async def finalize_tick() -> None:
        for partition, commit in (await _tick(app, finalize.tick)).items():
            ledger.release(TP(settings.partials_topic, partition), commit.offset, commit.metadata)


async def _tick(
    app: faust.App, tick: Callable[[], Awaitable[dict[int, Commit]]]
) -> dict[int, Commit]:
    """A role's tick, or nothing to commit when the worker stops under it.

    mode stops an app's services (the producer among them) before it cancels its timers, so
    a tick under way at SIGTERM may find the producer gone. Nothing is committed then: the
    partitions' next owner redoes the tick from the last commit.
    """
    if app.should_stop:
        return {}
    try:
        return await tick()
    except NotReady:
        if app.should_stop:
            return {}
        raise


def run_worker(settings: WorkerSettings) -> None:
    """Create topics, then run the worker's roles until it is stopped."""
    from processor.worker.gc_tuning import tune_for_throughput
    from processor.worker.logging_setup import configure_logging
    from processor.worker.topics import ensure_topics

    logging_config = configure_logging(settings)
    counts = asyncio.run(ensure_topics(settings))
    tune_for_throughput()
    if set(settings.roles) == {"forward"}:
        _run_forward_only(settings, logging_config)
        return
    app = create_app(settings, source_partitions=counts.get(settings.aggregate_topic))
    # mode replaces the root logger's handlers when the worker starts: hand it ours.
    worker = faust.Worker(
        app, loglevel=settings.log_level.upper(), quiet=True, logging_config=logging_config
    )
    worker.execute_from_commandline()


def _run_forward_only(settings: WorkerSettings, logging_config: Any) -> None:
    """The forward role alone needs no faust app: no group of the aggregating roles is joined."""
    if not settings.phoenix_enabled:
        from processor.errors import ConfigurationError

        raise ConfigurationError(
            "--roles forward has nothing to do with PROCESSOR_PHOENIX_ENABLED=false: enable "
            "forwarding, or run the other roles"
        )
    forward = build_forward_consumer(settings)
    observability = ObservabilityService(
        app=None, settings=settings, aggregate=None, finalize=None, forward=forward, ledger=None
    )
    observability.add_dependency(forward)
    worker = mode.Worker(
        observability,
        loglevel=settings.log_level.upper(),
        quiet=True,
        logging_config=logging_config,
    )
    worker.execute_from_commandline()
