"""The worker's self-metrics (Prometheus), its HTTP endpoints and the local worker registry.

``install_observability(app, settings, aggregate=..., finalize=..., forward=..., ledger=...)``
is all ``create_app`` calls (a role the worker does not run is None). It adds one service to
the faust app, started before the Kafka consumer (so the endpoints answer while the worker
joins its group) and stopped after it; a forward-only worker runs the service without faust:

- ``GET /metrics``: Prometheus text. ``RoleCollector`` reads the counters the roles keep
  anyway at scrape time; nothing on the hot path increments a Prometheus object.
- ``GET /healthz`` (live) and ``GET /readyz`` (ready): 200 or 503 with a JSON body; the rules
  are in ``processor.worker.health``.
- ``GET /status``: JSON for ``trace-processor status``: readiness, assignment, the last windows
  written, the last warnings and errors.

The server binds ``metrics_host`` on ``metrics_port``, or the next free port up to 99 above it
(several workers on one machine), or any free port when ``metrics_port`` is 0. The worker
notes its URL in ``registry_dir/<worker id>.json`` and removes the note when it stops;
``trace-processor status`` reads the folder.

Counters that the roles keep per assignment (a ``PartitionAggregator`` starts at zero each
time its partition is assigned) are carried into totals that never go down: the collector
notices a replaced aggregator at the next scrape or sweep (every second) and adds what the old
one had counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mode
import orjson
from aiohttp import web
from faust.types import TP
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from processor.core.alerts import FIRING, RESOLVED
from processor.core.sampling.policy import KEEP_REASONS
from processor.errors import ConfigurationError
from processor.settings import WorkerSettings
from processor.worker.health import (
    DependencyProbes,
    GroupState,
    MlflowProbe,
    PhoenixProbe,
    Probe,
    ReadinessReport,
    evaluate_readiness,
    restored_partitions,
)
from processor.worker.logging_setup import recent_problems, worker_id_of

if TYPE_CHECKING:  # `trace-processor status` imports this module: no MLflow or faust app here
    import faust

    from processor.core.partition import PartitionAggregator
    from processor.core.sampling import SamplingStats
    from processor.sinks.mlflow_writer import RollupWriter
    from processor.worker.alerting import Alerting
    from processor.worker.commits import CommitLedger
    from processor.worker.forward_consumer import ForwardConsumer

log = logging.getLogger(__name__)

PREFIX = "trace_processor_"
PORT_SEARCH = 100  # metrics_port, metrics_port + 1, ... metrics_port + 99
SWEEP_INTERVAL_S = 1.0
RECENT_WINDOWS_SHOWN = 20


# -- what the collector reads --------------------------------------------------------------


class AggregateCounters(Protocol):
    @property
    def partials(self) -> int: ...
    @property
    def skipped_messages(self) -> int: ...
    @property
    def messages_by_partition(self) -> Mapping[int, int]: ...
    @property
    def spans_by_partition(self) -> Mapping[int, int]: ...
    @property
    def dead_letters_by_reason(self) -> Mapping[str, int]: ...
    @property
    def kept_spans(self) -> int: ...
    @property
    def repartitioned_messages(self) -> int: ...
    @property
    def repartition_pieces(self) -> int: ...
    @property
    def duplicate_pieces(self) -> int: ...
    @property
    def kept_records(self) -> int: ...


class AggregateView(Protocol):
    @property
    def counters(self) -> AggregateCounters: ...
    @property
    def partitions(self) -> Mapping[int, PartitionAggregator]: ...
    @property
    def samples(self) -> bool: ...
    @property
    def hands_off_kept(self) -> bool: ...


class WrittenWindowView(Protocol):
    @property
    def agent(self) -> str: ...
    @property
    def window_start_ms(self) -> int: ...
    @property
    def window_end_ms(self) -> int: ...
    @property
    def written_at_ms(self) -> int: ...
    @property
    def spans(self) -> int: ...
    @property
    def errors(self) -> int: ...


class FinalizeView(Protocol):
    @property
    def mergers(self) -> Mapping[int, object]: ...
    @property
    def windows_written(self) -> int: ...
    @property
    def write_retries(self) -> int: ...
    @property
    def bad_records(self) -> int: ...
    @property
    def freshness_ms_sum(self) -> int: ...
    @property
    def recent_windows(self) -> Sequence[WrittenWindowView]: ...
    @property
    def alerting(self) -> Alerting | None: ...
    def firing_alerts(self) -> list[tuple[str, str, tuple[str, ...], int]]: ...


class CarriedTotals:
    """Totals per partition of counters held by per-assignment stats objects.

    ``update(current)`` is given the live stats object of each partition; when a partition's
    object is replaced or gone, the old object's final counts join the partition's total.
    """

    def __init__(
        self,
        fields: tuple[str, ...],
        read: Callable[[Any, str], int] = getattr,
    ) -> None:
        self._fields = fields
        self._read = read  # (stats object, field name) -> count
        self._live: dict[int, object] = {}
        self._retired: dict[int, dict[str, int]] = {}

    def update(self, current: Mapping[int, object]) -> None:
        for partition, old in self._live.items():
            if current.get(partition) is not old:
                retired = self._retired.setdefault(partition, dict.fromkeys(self._fields, 0))
                for name in self._fields:
                    retired[name] += self._read(old, name)
        self._live = dict(current)

    def totals(self) -> dict[int, dict[str, int]]:
        result: dict[int, dict[str, int]] = {}
        read = self._read
        for partition in sorted(self._retired.keys() | self._live.keys()):
            retired = self._retired.get(partition)
            live = self._live.get(partition)
            result[partition] = {
                name: (retired[name] if retired else 0) + (read(live, name) if live else 0)
                for name in self._fields
            }
        return result


_PARTITION_COUNTERS = (
    "spans",
    "late_spans",
    "duplicate_spans",
    "overflow_spans",
    "windows_closed",
    "replayed_spans",
)
_ASSEMBLER_COUNTERS = ("evicted_traces", "resolved_without_parent")
# The sampler's outcomes as (decision, policy) labels of sampling_spans_total.
_DROPPED_NOT_SAMPLED, _DROPPED_RATE_LIMITED = "dropped:not_sampled", "dropped:rate_limited"
_DROPPED_BUDGET = "dropped:budget"
_SAMPLER_COUNTERS = (
    *(f"kept:{reason}" for reason in KEEP_REASONS),
    _DROPPED_NOT_SAMPLED,
    _DROPPED_RATE_LIMITED,
    _DROPPED_BUDGET,
    "decided_early",
    "decided_at_once",
    "decided_on_error",
)


def _read_sampling(stats: SamplingStats, name: str) -> int:
    if name.startswith("kept:"):
        return stats.spans_kept[name[len("kept:") :]]
    if name == _DROPPED_NOT_SAMPLED:
        return stats.spans_dropped - stats.spans_rate_limited - stats.spans_over_budget
    if name == _DROPPED_RATE_LIMITED:
        return stats.spans_rate_limited
    if name == _DROPPED_BUDGET:
        return stats.spans_over_budget
    return int(getattr(stats, name))


@dataclass(frozen=True, slots=True)
class ConsumerPosition:
    topic: str
    partition: int
    highwater: int | None  # offset the next message written will get
    position: int | None  # next offset this worker reads


def forward_lag(positions: Iterable[ConsumerPosition]) -> dict[int, int]:
    """Records not yet in Phoenix per sampled partition: high watermark minus the commit
    (the forward role reports its committed offset as its position)."""
    return {
        p.partition: max(0, p.highwater - (p.position or 0))
        for p in positions
        if p.highwater is not None
    }


class RoleCollector(Collector):
    """Prometheus metrics read from the roles and the consumers at scrape time.

    The names, types and labels are listed in ``docs/operations.md``; ``METRIC_NAMES`` holds
    them, and a test keeps the two in step.
    """

    def __init__(
        self,
        *,
        aggregate: AggregateView | None,
        finalize: FinalizeView | None,
        forward: ForwardConsumer | None,
        writer: RollupWriter | None,
        positions: Callable[[], list[ConsumerPosition]],
        held: Callable[[str, int], int],
        readiness: Callable[[], tuple[ReadinessReport, Mapping[str, bool | None]]],
        info: Mapping[str, str],
    ) -> None:
        self._aggregate = aggregate
        self._finalize = finalize
        self._forward = forward
        self._writer = writer
        self._positions = positions
        self._held = held
        self._readiness = readiness
        self._info = dict(info)
        self._partition_totals = CarriedTotals(_PARTITION_COUNTERS)
        self._assembler_totals = CarriedTotals(_ASSEMBLER_COUNTERS)
        self._sampler_totals = CarriedTotals(_SAMPLER_COUNTERS, _read_sampling)

    def describe(self) -> Iterable[Metric]:
        return []  # no collect() at registration: the stages may not be running yet

    def sweep(self) -> None:
        """Notice replaced aggregators (call often: counts of one never seen are lost)."""
        if self._aggregate is None:
            return
        aggregators = dict(self._aggregate.partitions)
        self._partition_totals.update({p: a.stats for p, a in aggregators.items()})
        self._assembler_totals.update({p: a.assembler.stats for p, a in aggregators.items()})
        self._sampler_totals.update(
            {p: a.sampler.stats for p, a in aggregators.items() if a.sampler is not None}
        )

    def collect(self) -> Iterator[Metric]:
        self.sweep()
        if self._aggregate is not None:
            yield from self._aggregate_metrics(self._aggregate)
            yield from self._buffer_metrics(self._aggregate)
        if self._forward is not None:
            yield from self._phoenix_metrics(self._forward)
        if self._finalize is not None:
            yield from self._finalize_metrics(self._finalize)
        yield from self._consumer_metrics()
        yield from self._health_metrics()

    def _aggregate_metrics(self, aggregate: AggregateView) -> Iterator[Metric]:
        counters = aggregate.counters
        yield _per_partition(
            "messages_consumed",
            "Kafka messages of the spans topic read by aggregate.",
            counters.messages_by_partition,
        )
        yield _per_partition(
            "spans_in", "Valid spans decoded from those messages.", counters.spans_by_partition
        )
        yield _counter(
            "messages_skipped",
            "Messages read for a partition revoked meanwhile, or read twice: not processed.",
            counters.skipped_messages,
        )
        dead = CounterMetricFamily(
            PREFIX + "dead_letters",
            "Records written to the dead-letter topic, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(counters.dead_letters_by_reason.items()):
            dead.add_metric([reason], count)
        if self._forward is not None:
            batches = self._forward.role.forwarder.stats.dead_lettered_batches
            dead.add_metric(["phoenix_rejected"], batches)
        yield dead
        totals = self._partition_totals.totals()
        for name, field_name, doc in (
            ("spans_aggregated", "spans", "Spans added to a window aggregate (replays included)."),
            ("late_spans", "late_spans", "Spans whose window had closed: counted as late."),
            (
                "duplicate_spans",
                "duplicate_spans",
                "Copies of spans counted already (same trace and span id): not counted again.",
            ),
            ("overflow_spans", "overflow_spans", "Spans folded into __overflow__ series."),
            ("replayed_spans", "replayed_spans", "Replayed spans of windows already sent."),
            ("windows_closed", "windows_closed", "Windows closed by aggregate (partials sent)."),
        ):
            yield _per_partition(name, doc, {p: t[field_name] for p, t in totals.items()})
        yield _counter("partials_sent", "Partial records sent to finalize.", counters.partials)
        yield _counter(
            "kept_spans_written",
            "Kept spans written to the sampled topic (a replay writes some again).",
            counters.kept_spans,
        )
        yield _counter(
            "kept_records_written", "Records written to the sampled topic.", counters.kept_records
        )
        yield _counter(
            "repartitioned_messages",
            "Messages of the spans topic split per trace by the repartition.",
            counters.repartitioned_messages,
        )
        yield _counter(
            "repartition_pieces",
            "Per-trace pieces the repartition wrote.",
            counters.repartition_pieces,
        )
        yield _counter(
            "repartition_duplicate_pieces",
            "Pieces a replay of the repartition wrote again, dropped before aggregation.",
            counters.duplicate_pieces,
        )
        total_in = sum(counters.spans_by_partition.values())
        sampling = CounterMetricFamily(
            PREFIX + "sampling_spans",
            "Sampling decisions on spans, by decision and policy: the reason a span was kept, "
            "or why it was dropped.",
            labels=["decision", "policy"],
        )
        sampled = self._sampler_totals.totals()
        if not aggregate.hands_off_kept:
            sampling.add_metric(["dropped", "phoenix_disabled"], total_in)
        elif not aggregate.samples:
            sampling.add_metric(["kept", "all"], total_in)
        else:
            for name in _SAMPLER_COUNTERS:
                if ":" not in name:
                    continue  # a count of traces, not spans
                decision, policy = name.split(":")
                sampling.add_metric(
                    [decision, policy], sum(counts[name] for counts in sampled.values())
                )
        yield sampling
        yield _per_partition(
            "sampling_decided_early_traces",
            "Traces decided before their root's end plus grace: pushed out by the bounds.",
            {p: counts["decided_early"] for p, counts in sampled.items()},
        )
        yield _per_partition(
            "sampling_decided_at_once_traces",
            "Traces decided on their first span: only the probability could keep them.",
            {p: counts["decided_at_once"] for p, counts in sampled.items()},
        )
        yield _per_partition(
            "sampling_decided_on_error_traces",
            "Traces kept on their first error span: no later span could change the answer.",
            {p: counts["decided_on_error"] for p, counts in sampled.items()},
        )

    def _buffer_metrics(self, aggregate: AggregateView) -> Iterator[Metric]:
        aggregators = dict(aggregate.partitions)
        traces = GaugeMetricFamily(
            PREFIX + "trace_buffer_traces", "Traces held in the trace buffer.", labels=["partition"]
        )
        waiting = GaugeMetricFamily(
            PREFIX + "trace_buffer_waiting_spans",
            "Spans held back waiting for their parent.",
            labels=["partition"],
        )
        open_windows = GaugeMetricFamily(
            PREFIX + "open_windows", "Windows open in aggregate.", labels=["partition"]
        )
        watermark = GaugeMetricFamily(
            PREFIX + "watermark_timestamp_seconds",
            "Event-time watermark of the partition.",
            labels=["partition"],
        )
        for partition, aggregator in sorted(aggregators.items()):
            label = [str(partition)]
            traces.add_metric(label, aggregator.assembler.stats.traces)
            waiting.add_metric(label, aggregator.assembler.stats.pending_spans)
            open_windows.add_metric(label, len(aggregator.open_windows))
            if aggregator.watermark.value_ms is not None:
                watermark.add_metric(label, aggregator.watermark.value_ms / 1000)
        yield from (traces, waiting, open_windows, watermark)
        totals = self._assembler_totals.totals()
        yield _per_partition(
            "trace_buffer_evicted_traces",
            "Traces evicted early to respect the buffer's bounds.",
            {p: t["evicted_traces"] for p, t in totals.items()},
        )
        yield _per_partition(
            "orphan_spans",
            "Waiting spans attributed without their parent (wait over, or evicted).",
            {p: t["resolved_without_parent"] for p, t in totals.items()},
        )

    def _phoenix_metrics(self, forward: ForwardConsumer) -> Iterator[Metric]:
        forwarder = forward.role.forwarder
        stats = forwarder.stats
        counters = forward.role.counters
        yield _counter(
            "forward_records", "Records of the sampled topic read by forward.", counters.records
        )
        yield _counter(
            "forward_records_lost",
            "Records of the sampled topic removed by retention before they were forwarded.",
            counters.lost_records,
        )
        yield _counter(
            "forward_records_skipped",
            "Records read for a partition revoked meanwhile, or read twice: not forwarded.",
            counters.skipped_records,
        )
        yield _counter(
            "forward_bad_records",
            "Records of the sampled topic that were not OTLP requests, ignored.",
            counters.bad_records,
        )
        lag = GaugeMetricFamily(
            PREFIX + "forward_lag_messages",
            "Records of the sampled topic not yet in Phoenix (high watermark minus commit).",
            labels=["partition"],
        )
        for partition, behind in sorted(forward_lag(forward.positions()).items()):
            lag.add_metric([str(partition)], behind)
        yield lag
        oldest = forward.role.oldest_pending_ms()
        yield _gauge(
            "forward_oldest_unforwarded_age_seconds",
            "Age of the oldest kept span read but not yet written by Phoenix (0: none).",
            0.0 if oldest is None else max(0.0, time.time() - oldest / 1000),
        )
        yield _counter(
            "phoenix_spans_accepted", "Spans Phoenix accepted (forwarded).", stats.accepted_spans
        )
        yield _counter(
            "phoenix_batches_accepted", "Requests Phoenix accepted.", stats.accepted_batches
        )
        yield _counter(
            "phoenix_batches_resent",
            "Batches Phoenix accepted but had not written (it lost its queue): sent again.",
            stats.resent_batches,
        )
        retries = CounterMetricFamily(
            PREFIX + "phoenix_retries",
            "Failed Phoenix requests retried, by HTTP status ('connection': no answer).",
            labels=["status"],
        )
        for status, count in sorted(stats.retries_by_status.items()):
            retries.add_metric([status], count)
        yield retries
        yield _counter(
            "phoenix_spans_dead_lettered",
            "Spans Phoenix refused for good, sent to the dead-letter topic.",
            stats.dead_lettered_spans,
        )
        yield _counter(
            "phoenix_spans_dropped_on_revoke",
            "Buffered spans dropped when their partition was revoked (the next owner resends).",
            stats.dropped_on_revoke_spans,
        )
        yield _gauge(
            "phoenix_spans_pending",
            "Spans buffered or in flight, not yet accepted.",
            forwarder.pending_spans(),
        )
        yield _gauge(
            "phoenix_requests_in_flight", "Requests to Phoenix out now.", forwarder.in_flight
        )
        yield _gauge(
            "phoenix_unauthorized",
            "1 while Phoenix refuses the API key.",
            1 if stats.unauthorized else 0,
        )

    def _alert_metrics(self, finalize: FinalizeView) -> Iterator[Metric]:
        alerting = finalize.alerting
        if alerting is None:
            return
        firing = GaugeMetricFamily(
            PREFIX + "alert_firing",
            "1 while the rule's alert is firing for the agent (its series).",
            labels=["rule", "agent"],
        )
        for rule, _, series, _ in finalize.firing_alerts():
            firing.add_metric([rule, " ".join(series)], 1)
        yield firing
        events = CounterMetricFamily(
            PREFIX + "alert_events", "Alert events sent, by state.", labels=["state"]
        )
        for state in (FIRING, RESOLVED):
            events.add_metric([state], alerting.events[state])
        yield events
        webhook = alerting.webhook
        if webhook is not None:
            yield _counter(
                "alert_webhook_delivered", "Alert events the webhook took.", webhook.delivered
            )
            yield _counter(
                "alert_webhook_failed_attempts",
                "Webhook calls that failed and were retried.",
                webhook.failed_attempts,
            )
            yield _counter(
                "alert_webhook_rejected",
                "Alert events the webhook refused (4xx), not retried.",
                webhook.rejected,
            )
            yield _counter(
                "alert_webhook_dropped",
                "Alert events dropped from a full webhook queue (the alerts topic has them).",
                webhook.dropped,
            )

    def _finalize_metrics(self, finalize: FinalizeView) -> Iterator[Metric]:
        yield _counter(
            "windows_finalized",
            "Final windows written to MLflow by finalize.",
            finalize.windows_written,
        )
        yield _counter(
            "mlflow_write_retries", "Failed MLflow writes retried.", finalize.write_retries
        )
        yield _counter(
            "partials_bad_records",
            "Records of the partials topic that were not ours, ignored.",
            finalize.bad_records,
        )
        if self._writer is not None:
            yield _counter(
                "mlflow_windows_written",
                "Windows MLflow stored (a replayed window already there is skipped).",
                self._writer.windows_written,
            )
            yield _counter(
                "mlflow_windows_skipped",
                "Windows already in MLflow, not written again.",
                self._writer.windows_skipped,
            )
            yield _counter(
                "mlflow_hours_written",
                "Hours (hour/<metric> points of a series) MLflow stored.",
                self._writer.hours_written,
            )
        yield from self._alert_metrics(finalize)
        freshness = SummaryMetricFamily(
            PREFIX + "window_freshness_seconds",
            "Wall clock at write time minus window end, over every window written.",
            count_value=finalize.windows_written,
            sum_value=finalize.freshness_ms_sum / 1000,
        )
        yield freshness
        recent = finalize.recent_windows
        last = GaugeMetricFamily(
            PREFIX + "last_window_freshness_seconds",
            "Freshness of the window written last (write time minus window end).",
        )
        last_end = GaugeMetricFamily(
            PREFIX + "last_window_end_timestamp_seconds", "End of the window written last."
        )
        if recent:
            newest = recent[-1]
            last.add_metric([], (newest.written_at_ms - newest.window_end_ms) / 1000)
            last_end.add_metric([], newest.window_end_ms / 1000)
        yield last
        yield last_end

    def _consumer_metrics(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            PREFIX + "consumer_lag",
            "Messages in the partition not read yet (high watermark minus position).",
            labels=["topic", "partition"],
        )
        held = GaugeMetricFamily(
            PREFIX + "uncommitted_messages",
            "Messages read whose offsets are not released for commit yet (open windows, "
            "windows not in MLflow yet).",
            labels=["topic", "partition"],
        )
        assigned = GaugeMetricFamily(
            PREFIX + "assigned_partitions", "Partitions assigned to this worker.", labels=["topic"]
        )
        per_topic: dict[str, int] = {}
        for position in self._positions():
            labels = [position.topic, str(position.partition)]
            per_topic[position.topic] = per_topic.get(position.topic, 0) + 1
            if position.highwater is not None and position.position is not None:
                lag.add_metric(labels, max(0, position.highwater - position.position))
            held.add_metric(labels, self._held(position.topic, position.partition))
        for topic, count in sorted(per_topic.items()):
            assigned.add_metric([topic], count)
        yield from (lag, held, assigned)

    def _health_metrics(self) -> Iterator[Metric]:
        report, dependencies = self._readiness()
        yield _gauge("ready", "1 when the worker is ready (see /readyz).", int(report.ready))
        up = GaugeMetricFamily(
            PREFIX + "dependency_up",
            "1 when the dependency answered the last probe as it should.",
            labels=["dependency"],
        )
        for name, ok in sorted(dependencies.items()):
            up.add_metric([name], 1 if ok else 0)
        yield up
        yield InfoMetricFamily(PREFIX + "worker", "This worker.", value=self._info)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _per_partition(name: str, doc: str, values: Mapping[int, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["partition"])
    for partition, value in sorted(values.items()):
        family.add_metric([str(partition)], value)
    return family


# Every sample name the collector can expose (documented in docs/operations.md).
METRIC_NAMES = tuple(
    PREFIX + name
    for name in (
        "messages_consumed_total",
        "spans_in_total",
        "messages_skipped_total",
        "dead_letters_total",
        "spans_aggregated_total",
        "late_spans_total",
        "duplicate_spans_total",
        "overflow_spans_total",
        "replayed_spans_total",
        "windows_closed_total",
        "partials_sent_total",
        "kept_spans_written_total",
        "kept_records_written_total",
        "repartitioned_messages_total",
        "repartition_pieces_total",
        "repartition_duplicate_pieces_total",
        "sampling_spans_total",
        "sampling_decided_early_traces_total",
        "sampling_decided_at_once_traces_total",
        "sampling_decided_on_error_traces_total",
        "trace_buffer_traces",
        "trace_buffer_waiting_spans",
        "open_windows",
        "watermark_timestamp_seconds",
        "trace_buffer_evicted_traces_total",
        "orphan_spans_total",
        "forward_records_total",
        "forward_records_lost_total",
        "forward_records_skipped_total",
        "forward_bad_records_total",
        "forward_lag_messages",
        "forward_oldest_unforwarded_age_seconds",
        "phoenix_spans_accepted_total",
        "phoenix_batches_accepted_total",
        "phoenix_batches_resent_total",
        "phoenix_retries_total",
        "phoenix_spans_dead_lettered_total",
        "phoenix_spans_dropped_on_revoke_total",
        "phoenix_spans_pending",
        "phoenix_requests_in_flight",
        "phoenix_unauthorized",
        "windows_finalized_total",
        "mlflow_write_retries_total",
        "partials_bad_records_total",
        "mlflow_windows_written_total",
        "mlflow_windows_skipped_total",
        "mlflow_hours_written_total",
        "alert_firing",
        "alert_events_total",
        "alert_webhook_delivered_total",
        "alert_webhook_failed_attempts_total",
        "alert_webhook_rejected_total",
        "alert_webhook_dropped_total",
        "window_freshness_seconds_count",
        "window_freshness_seconds_sum",
        "last_window_freshness_seconds",
        "last_window_end_timestamp_seconds",
        "consumer_lag",
        "uncommitted_messages",
        "assigned_partitions",
        "ready",
        "dependency_up",
        "worker_info",
    )
)


# -- the local registry --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisteredWorker:
    """One worker's note in the registry: where its HTTP endpoints are."""

    worker_id: str
    url: str
    pid: int
    hostname: str
    app_id: str
    started_at_s: float

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> RegisteredWorker:
        raw = orjson.loads(data)
        return cls(
            worker_id=str(raw["worker_id"]),
            url=str(raw["url"]),
            pid=int(raw["pid"]),
            hostname=str(raw["hostname"]),
            app_id=str(raw["app_id"]),
            started_at_s=float(raw["started_at_s"]),
        )


class WorkerRegistry:
    """A folder with one JSON note per running worker of this machine."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, worker_id: str) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', worker_id)}.json"

    def register(self, worker: RegisteredWorker) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_of(worker.worker_id)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(worker.to_json())
        temporary.replace(path)  # atomic: a reader never sees half a note
        return path

    def unregister(self, worker_id: str) -> None:
        self.path_of(worker_id).unlink(missing_ok=True)

    def workers(self) -> list[RegisteredWorker]:
        """The workers whose note is readable and whose process still runs (on this host).

        Notes left by a worker that was killed are removed on the way."""
        found: list[RegisteredWorker] = []
        if not self.directory.is_dir():
            return found
        hostname = socket.gethostname()
        for path in sorted(self.directory.glob("*.json")):
            try:
                worker = RegisteredWorker.from_json(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written by a foreign tool, or gone meanwhile
            if worker.hostname == hostname and not _process_runs(worker.pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            found.append(worker)
        return found


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def bind_listener(host: str, port: int, search: int = PORT_SEARCH) -> socket.socket:
    """A listening socket on ``port`` or the next free one (any free one when 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [0] if port == 0 else range(port, min(port + search, 65536))
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Lets a restarted worker take its port back from TIME_WAIT; never a second listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(64)
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        return sock
    raise ConfigurationError(
        f"no free port for the metrics and health server on {host} from {port} to "
        f"{port + search - 1}; set PROCESSOR_METRICS_PORT (0: any free port)"
    )


def url_of(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- the service ---------------------------------------------------------------------------


class ObservabilityService(mode.Service):
    """Serves /metrics, /healthz, /readyz and /status; keeps the registry note and probes."""

    def __init__(
        self,
        *,
        app: faust.App | None,
        settings: WorkerSettings,
        aggregate: AggregateView | None,
        finalize: FinalizeView | None,
        forward: ForwardConsumer | None,
        ledger: CommitLedger | None,
        writer: RollupWriter | None = None,
        probes: Sequence[Probe] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.worker_id = worker_id_of(settings)
        self._aggregate = aggregate
        self._finalize = finalize
        self._forward = forward
        self._ledger = ledger
        self._topics = tuple(
            dict.fromkeys((settings.spans_topic, settings.aggregate_topic, settings.partials_topic))
        )
        if probes is None:
            # A role is ready when what it writes to answers: aggregate writes only to Kafka.
            probes = []
            if forward is not None:
                probes.append(
                    PhoenixProbe(
                        traces_url=settings.phoenix_traces_url, api_key=settings.phoenix_api_key
                    )
                )
            if finalize is not None:
                probes.append(MlflowProbe(tracking_uri=settings.mlflow_tracking_uri))
        self.dependencies = DependencyProbes(list(probes))
        self.registry = WorkerRegistry(settings.registry_dir)
        self.metrics_registry = CollectorRegistry()
        ProcessCollector(registry=self.metrics_registry)
        PlatformCollector(registry=self.metrics_registry)
        self.collector = RoleCollector(
            aggregate=aggregate,
            finalize=finalize,
            forward=forward,
            writer=writer,
            positions=self.positions,
            held=self._held,
            readiness=self._readiness_for_metrics,
            info={
                "worker_id": self.worker_id,
                "app_id": settings.app_id,
                "roles": ",".join(settings.roles),
                "version": _version(),
            },
        )
        self.metrics_registry.register(self.collector)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._started_at_s = time.time()

    # -- state -----------------------------------------------------------------------------

    def _faust_assignment(self) -> frozenset[tuple[str, int]]:
        if self.app is None:
            return frozenset()
        try:
            assigned = self.app.consumer.assignment()
        except Exception:  # consumer not started yet, or stopping
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in assigned if tp.topic in self._topics)

    def _forward_assignment(self) -> frozenset[tuple[str, int]]:
        if self._forward is None:
            return frozenset()
        topic = self.settings.sampled_topic
        return frozenset((topic, partition) for partition in self._forward.role.assigned)

    def assignment(self) -> frozenset[tuple[str, int]]:
        return self._faust_assignment() | self._forward_assignment()

    def positions(self) -> list[ConsumerPosition]:
        found: list[ConsumerPosition] = []
        if self.app is not None:
            consumer = self.app.consumer
            for topic, partition in sorted(self._faust_assignment()):
                tp = TP(topic, partition)
                try:
                    highwater = consumer.highwater(tp)
                except Exception:  # no fetch yet, or just revoked
                    highwater = None
                # faust keeps the last offset handed to the streams and the last commit; its
                # public API has neither.
                read = getattr(consumer, "_read_offset", {}).get(tp)
                committed = getattr(consumer, "_committed_offset", {}).get(tp)
                position = read + 1 if read is not None else committed
                found.append(ConsumerPosition(topic, partition, highwater, position))
        if self._forward is not None:
            found.extend(self._forward.positions())
        return found

    def _held(self, topic: str, partition: int) -> int:
        if self._ledger is None:
            return 0
        return self._ledger.held_count(TP(topic, partition))

    def group_state(self) -> GroupState:
        app = self.app
        settings = self.settings
        assigned = self.assignment()
        restored = restored_partitions(
            spans_topic=settings.aggregate_topic,
            partials_topic=settings.partials_topic,
            aggregate_partitions=list(self._aggregate.partitions) if self._aggregate else [],
            finalize_partitions=list(self._finalize.mergers) if self._finalize else [],
        )
        if settings.repartition_by_trace_id:
            # The repartition keeps no state: its partitions are ready once assigned.
            restored |= {tp for tp in assigned if tp[0] == settings.spans_topic}
        joined, rebalancing = True, False
        if app is not None:
            joined = app.rebalancing_count > 0
            rebalancing = bool(app.rebalancing)
        forward = self._forward
        if forward is not None:
            # The forward role's partitions need no state: ready once assigned.
            restored |= self._forward_assignment()
            joined = joined and forward.joined
            rebalancing = rebalancing or forward.rebalancing
        stopping = self.should_stop or (app is not None and bool(app.should_stop))
        return GroupState(
            joined=joined,
            rebalancing=rebalancing,
            stopping=stopping,
            assigned=assigned,
            restored=restored,
        )

    def readiness(self) -> ReadinessReport:
        return evaluate_readiness(self.group_state(), self.dependencies.results)

    def _readiness_for_metrics(self) -> tuple[ReadinessReport, dict[str, bool | None]]:
        results = self.dependencies.results
        return self.readiness(), {
            name: None if check is None else check.ok for name, check in results.items()
        }

    @property
    def live(self) -> bool:
        crashed = self.app is not None and self.app.crashed
        return not (crashed or (self._forward is not None and self._forward.crashed))

    def status(self) -> dict[str, Any]:
        report = self.readiness()
        assignment: dict[str, list[int]] = {}
        for topic, partition in sorted(self.assignment()):
            assignment.setdefault(topic, []).append(partition)
        finalize = self._finalize
        windows = list(finalize.recent_windows)[-RECENT_WINDOWS_SHOWN:] if finalize else []
        forward = self._forward
        forwarding: dict[str, Any] | None = None
        if forward is not None:
            oldest = forward.role.oldest_pending_ms()
            forwarding = {
                "lag_messages": sum(forward_lag(forward.positions()).values()),
                "oldest_unforwarded_age_s": (
                    None if oldest is None else max(0.0, time.time() - oldest / 1000)
                ),
                "spans_pending": forward.role.forwarder.pending_spans(),
                "lost_records": forward.role.counters.lost_records,
            }
        return {
            "worker_id": self.worker_id,
            "app_id": self.settings.app_id,
            "roles": list(self.settings.roles),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "url": self.url,
            "started_at_s": self._started_at_s,
            "now_s": time.time(),
            "live": self.live,
            **report.as_dict(),
            "dependencies": self.dependencies.as_dict(),
            "topics": {
                "spans": self.settings.aggregate_topic,
                "partials": self.settings.partials_topic,
                "sampled": self.settings.sampled_topic,
            },
            "assignment": assignment,
            "forwarding": forwarding,
            "recent_windows": [
                {
                    "agent": w.agent,
                    "window_start_ms": w.window_start_ms,
                    "window_end_ms": w.window_end_ms,
                    "written_at_ms": w.written_at_ms,
                    "spans": w.spans,
                    "errors": w.errors,
                }
                for w in reversed(windows)
            ],
            "recent_problems": list(reversed(recent_problems.snapshot())),
            "alerts_firing": [
                {"rule": rule, "severity": severity, "series": list(series), "since_ms": since}
                for rule, severity, series, since in (
                    finalize.firing_alerts() if finalize is not None else []
                )
            ],
        }

    # -- HTTP ------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        live = self.live
        return _json({"live": live, "worker_id": self.worker_id}, 200 if live else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        report = self.readiness()
        body = {
            **report.as_dict(),
            "worker_id": self.worker_id,
            "dependencies": self.dependencies.as_dict(),
        }
        return _json(body, 200 if report.ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.status(), 200)

    # -- lifecycle -------------------------------------------------------------------------

    async def on_start(self) -> None:
        settings = self.settings
        sock = bind_listener(settings.metrics_host, settings.metrics_port)
        port = sock.getsockname()[1]
        self.url = url_of(settings.metrics_host, port)
        web_app = web.Application()
        web_app.router.add_get("/metrics", self._metrics)
        web_app.router.add_get("/healthz", self._healthz)
        web_app.router.add_get("/readyz", self._readyz)
        web_app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        note = RegisteredWorker(
            worker_id=self.worker_id,
            url=self.url,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            app_id=settings.app_id,
            started_at_s=self._started_at_s,
        )
        try:
            path = self.registry.register(note)
        except OSError as exc:
            # The registry only helps `status` find the worker; the worker runs without it.
            log.warning(
                "metrics and health at %s; could not note it in %s (%s), so "
                "`trace-processor status` needs --url %s",
                self.url,
                self.registry.directory,
                exc,
                self.url,
            )
        else:
            log.info("metrics and health at %s (noted in %s)", self.url, path)

    async def on_started(self) -> None:
        self.add_future(self._probe_forever())
        self.add_future(self._sweep_forever())

    async def _probe_forever(self) -> None:
        interval = self.settings.health_check_interval_s
        while not self.should_stop:
            await self.dependencies.check_all()
            await asyncio.sleep(interval)

    async def _sweep_forever(self) -> None:
        while not self.should_stop:
            self.collector.sweep()
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def on_stop(self) -> None:
        with contextlib.suppress(OSError):
            self.registry.unregister(self.worker_id)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.dependencies.close()


def _json(body: Mapping[str, Any], status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json"
    )


def _version() -> str:
    try:
        return metadata.version("agent-trace-processor")
    except metadata.PackageNotFoundError:
        return "unknown"


def install_observability(
    app: faust.App,
    settings: WorkerSettings,
    *,
    aggregate: AggregateView | None,
    finalize: FinalizeView | None,
    forward: ForwardConsumer | None,
    ledger: CommitLedger,
    writer: RollupWriter | None = None,
) -> ObservabilityService:
    """Add the metrics, health and status server to ``app`` (call in ``create_app``).

    It starts before the Kafka consumer and stops after it, so ``/readyz`` says 503 while the
    worker joins its group or shuts down instead of refusing connections.
    """
    service = ObservabilityService(
        app=app,
        settings=settings,
        aggregate=aggregate,
        finalize=finalize,
        forward=forward,
        ledger=ledger,
        writer=writer,
    )
    app.add_dependency(service)
    return service
