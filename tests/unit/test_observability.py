"""The worker's self-metrics, readiness rules, registry and HTTP endpoints, without Kafka.

The aggregate, finalize and forward roles and the Phoenix forwarder are the real classes, fed
real OTLP bytes; the kept-span records aggregate writes are handed to the forward role as the
sampled topic would. Only Kafka (the faust app and the forward role's consumer), MLflow (an
in-memory writer) and Phoenix (an ``httpx.MockTransport``) are stand-ins.
tests/integration/test_operations.py runs the same endpoints in a real worker process.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from processor.alert_rules import DEFAULT_RULES
from processor.core.alerts import AlertEvent
from processor.core.calendar import HourRollup
from processor.core.rollup import ALL_AGENTS, FinalRollup
from processor.core.sampling import SamplingPolicy
from processor.core.semconv import ExtractionConfig
from processor.settings import WorkerSettings
from processor.sinks.alert_webhook import AlertWebhook
from processor.sinks.phoenix import PhoenixExporter, RetryPolicy
from processor.worker.aggregate import AggregateRole, DeadLetter
from processor.worker.alerting import Alerting
from processor.worker.commits import CommitLedger
from processor.worker.finalize import FinalizeRole
from processor.worker.forward import ForwardRole
from processor.worker.health import DependencyCheck, GroupState, evaluate_readiness
from processor.worker.observability import (
    METRIC_NAMES,
    CarriedTotals,
    ConsumerPosition,
    ObservabilityService,
    RegisteredWorker,
    RoleCollector,
    WorkerRegistry,
    bind_listener,
    url_of,
)
from processor.worker.offsets import Commit
from processor.worker.phoenix_delivery import SpanForwarder
from tests.unit.core.spanbuilder import T0_MS, payload_of, span_pb

WINDOW_MS = 60_000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@dataclass
class MemoryWriter:
    """Stands in for RollupWriter: keeps what MLflow would have been sent."""

    written: list[FinalRollup] = field(default_factory=list)
    hours: list[HourRollup] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)
    windows_written: int = 0
    windows_skipped: int = 0
    hours_written: int = 0

    def write(
        self,
        finals: Sequence[FinalRollup],
        hours: Sequence[HourRollup] = (),
        alerts: Sequence[AlertEvent] = (),
    ) -> list[str | None]:
        self.written.extend(finals)
        self.windows_written += len(finals)
        self.hours.extend(hours)
        self.alerts.extend(alerts)
        return [None for _ in alerts]


@dataclass
class Pipeline:
    """Aggregate feeding finalize directly, as the partials topic would; the records aggregate
    writes to the sampled topic are kept in ``kept``, in order."""

    clock: Clock
    aggregate: AggregateRole
    finalize: FinalizeRole
    writer: MemoryWriter
    letters: list[DeadLetter]
    kept: list[tuple[bytes, bytes]] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)

    async def feed(self, partition: int, value: bytes) -> None:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        await self.aggregate.handle(partition, offset, None, value, {})

    async def forward_kept(self, role: ForwardRole, *, timestamp_ms: int = T0_MS) -> None:
        """Hand every kept-span record written so far to ``role``, as sampled partition 0."""
        for offset, (_, value) in enumerate(self.kept):
            await role.handle(0, offset, timestamp_ms, value)


def pipeline(
    *,
    forwarding: bool = False,
    max_traces: int = 2,
    assigned: bool = True,
    sampling: SamplingPolicy | None = None,
) -> Pipeline:
    """``forwarding``: kept spans are written to the sampled topic (Phoenix is enabled)."""
    clock = Clock(T0_MS)
    letters: list[DeadLetter] = []
    kept: list[tuple[bytes, bytes]] = []
    writer = MemoryWriter()
    finalize = FinalizeRole(source_partitions=1, max_wait_ms=1_000, writer=writer, clock=clock)  # type: ignore[arg-type]
    partials_offset = iter(range(1_000_000))

    async def send_partial(key: bytes, value: bytes, partition: int | None) -> None:
        finalize.handle(partition or 0, next(partials_offset), value)

    async def send_kept(key: bytes, value: bytes, partition: int | None) -> None:
        kept.append((key, value))

    async def send_dead_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    aggregate = AggregateRole(
        window_size_ms=WINDOW_MS,
        allowed_lateness_ms=1_000,
        idle_timeout_ms=1_000,
        max_traces=max_traces,
        max_series_per_window=100,
        partials_partitions=1,
        extraction=ExtractionConfig(),
        sampling=sampling,
        send_partial=send_partial,
        send_kept=send_kept if forwarding else None,
        send_dead_letter=send_dead_letter,
        clock=clock,
    )
    if assigned:  # as the worker does when Kafka assigns the partitions
        for partition in (0, 1):
            aggregate.assign(partition, None)
        finalize.assign(0, None)
    return Pipeline(clock, aggregate, finalize, writer, letters, kept)


@dataclass
class ForwardStandIn:
    """What the worker reads of a ``ForwardConsumer``, without Kafka: the real role, and the
    positions its consumer would report (high watermark and commit per partition)."""

    role: ForwardRole
    topic: str = "t.sampled"
    highwater: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    joined: bool = True
    rebalancing: bool = False
    crashed: bool = False

    def positions(self) -> list[ConsumerPosition]:
        return [
            ConsumerPosition(self.topic, p, self.highwater.get(p), self.committed.get(p))
            for p in sorted(self.role.assigned)
        ]


def trace_payload(trace: int, spans: int = 1, *, start_ms: int = T0_MS + 1_000) -> bytes:
    """One message: a root span and ``spans - 1`` children of agent 'planner'."""
    pbs = [span_pb(trace=trace, span=1, start_ms=start_ms, attrs={"agent.name": "planner"})]
    pbs += [
        span_pb(trace=trace, span=n, parent=1, start_ms=start_ms, duration_ms=10)
        for n in range(2, spans + 1)
    ]
    return payload_of(pbs, {"service.name": "agents"})


def collector_for(p: Pipeline, **overrides: Any) -> RoleCollector:
    arguments: dict[str, Any] = {
        "aggregate": p.aggregate,
        "finalize": p.finalize,
        "forward": None,
        "writer": p.writer,
        "positions": list,
        "held": lambda topic, partition: 0,
        "readiness": lambda: (evaluate_readiness(_ready_group(), {}), {}),
        "info": {"worker_id": "w1", "app_id": "app", "version": "test"},
    }
    arguments.update(overrides)
    return RoleCollector(**arguments)


def _ready_group() -> GroupState:
    return GroupState(True, False, False, frozenset(), frozenset())


def scrape(collector: RoleCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[("trace_processor_" + name, tuple(sorted(labels.items())))]


# -- the collector -------------------------------------------------------------------------


def test_aggregate_counters_per_partition_and_dead_letters_by_reason() -> None:
    async def scenario() -> None:
        p = pipeline(max_traces=2)
        await p.feed(0, trace_payload(1, spans=3))
        await p.feed(0, b"\x0a\xff")  # not OTLP
        for trace in (2, 3, 4):  # three traces on a buffer of two: one evicted early
            await p.feed(1, trace_payload(trace))
        samples = scrape(collector_for(p))
        assert value(samples, "messages_consumed_total", partition="0") == 2
        assert value(samples, "messages_consumed_total", partition="1") == 3
        assert value(samples, "spans_in_total", partition="0") == 3
        assert value(samples, "spans_in_total", partition="1") == 3
        assert value(samples, "dead_letters_total", reason="invalid_protobuf") == 1
        assert [letter.reason for letter in p.letters] == ["invalid_protobuf"]
        assert value(samples, "spans_aggregated_total", partition="0") == 3
        assert value(samples, "trace_buffer_traces", partition="1") == 2
        assert value(samples, "trace_buffer_evicted_traces_total", partition="1") == 1
        assert (
            value(samples, "sampling_spans_total", decision="dropped", policy="phoenix_disabled")
            == 6
        )

    asyncio.run(scenario())


def test_counters_survive_a_rebalance_and_never_go_down() -> None:
    async def scenario() -> None:
        p = pipeline(max_traces=100)
        collector = collector_for(p)
        await p.feed(0, trace_payload(1, spans=3))
        await p.feed(1, trace_payload(2, spans=2))
        first = scrape(collector)
        assert value(first, "spans_aggregated_total", partition="0") == 3
        # Counted after the scrape, by an aggregator about to be replaced: must not be lost.
        await p.feed(0, trace_payload(3, spans=2))
        p.aggregate.revoke_all()  # a rebalance: partition 1 goes elsewhere, 0 comes back
        p.aggregate.assign(0, None)
        await p.feed(0, trace_payload(4, spans=1))
        await p.feed(1, trace_payload(5, spans=1))  # read just before the revocation
        second = scrape(collector)
        assert value(second, "messages_skipped_total") == 1
        assert value(second, "spans_aggregated_total", partition="0") == 3 + 2 + 1
        assert value(second, "spans_aggregated_total", partition="1") == 2  # still counted
        assert value(second, "spans_in_total", partition="0") == 6
        # Gauges describe the present: only the partition this worker holds now.
        assert ("trace_processor_trace_buffer_traces", (("partition", "1"),)) not in second
        assert value(second, "trace_buffer_traces", partition="0") == 1
        for key, before in first.items():
            if key[0].endswith("_total"):
                assert second[key] >= before, key

    asyncio.run(scenario())


def test_closed_windows_reach_the_writer_and_freshness_is_measured() -> None:
    async def scenario() -> None:
        p = pipeline()
        await p.feed(0, trace_payload(1, spans=2))
        # Past the window end, lateness and idle timeout: the window closes.
        p.clock.now_ms = T0_MS + WINDOW_MS + 30_000
        await p.aggregate.tick(lambda partition: True)
        await p.finalize.tick()
        samples = scrape(collector_for(p))
        # The agent's window and the all-agents series' window.
        assert [final.series.agent for final in p.writer.written] == [ALL_AGENTS, "planner"]
        assert value(samples, "windows_closed_total", partition="0") == 1
        assert value(samples, "partials_sent_total") == 2
        assert value(samples, "windows_finalized_total") == 2
        assert value(samples, "mlflow_windows_written_total") == 2
        window_end_ms = T0_MS + WINDOW_MS
        freshness_s = (p.clock.now_ms - window_end_ms) / 1000
        assert value(samples, "window_freshness_seconds_count") == 2
        assert value(samples, "window_freshness_seconds_sum") == pytest.approx(2 * freshness_s)
        assert value(samples, "last_window_freshness_seconds") == pytest.approx(freshness_s)
        assert value(samples, "last_window_end_timestamp_seconds") == window_end_ms / 1000
        assert value(samples, "watermark_timestamp_seconds", partition="0") > T0_MS / 1000
        every, written = p.finalize.recent_windows
        assert (written.agent, written.spans, written.errors) == ("planner", 2, 0)
        assert (every.agent, every.spans, every.errors) == (ALL_AGENTS, 2, 0)

    asyncio.run(scenario())


def test_kept_spans_go_out_as_records_and_phoenix_is_measured_at_forward() -> None:
    answers = iter([503, 200])

    def phoenix(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers, 200))

    async def scenario() -> None:
        async def refused(batch: Any, result: Any) -> None:
            raise AssertionError("nothing is refused here")

        exporter = PhoenixExporter(
            traces_url="http://phoenix.test/v1/traces", transport=httpx.MockTransport(phoenix)
        )
        forwarder = SpanForwarder(
            exporter,
            default_project="default",
            on_failure=refused,
            batch_spans=3,
            retry=RetryPolicy(initial_s=0.001, max_s=0.002),
        )
        p = pipeline(forwarding=True)
        await p.feed(0, trace_payload(1, spans=3))
        assert len(p.kept) == 1, "one trace's kept spans: one record of the sampled topic"
        forward = ForwardStandIn(ForwardRole(forwarder), highwater={0: 1}, committed={0: 0})
        forward.role.assign(0, None, 0)
        await p.forward_kept(forward.role)  # a full batch: sent at once
        await forwarder.drain(5.0)
        assert forward.role.tick() == {0: Commit(1)}, "Phoenix took the record's spans"
        samples = scrape(collector_for(p, forward=forward))
        assert value(samples, "kept_spans_written_total") == 3
        assert value(samples, "kept_records_written_total") == 1
        assert value(samples, "forward_records_total") == 1
        assert value(samples, "forward_records_lost_total") == 0
        assert value(samples, "forward_bad_records_total") == 0
        assert value(samples, "phoenix_spans_accepted_total") == 3
        assert value(samples, "phoenix_batches_accepted_total") == 1
        assert value(samples, "phoenix_retries_total", status="503") == 1
        assert value(samples, "phoenix_spans_pending") == 0
        assert value(samples, "phoenix_unauthorized") == 0
        assert value(samples, "forward_oldest_unforwarded_age_seconds") == 0
        assert value(samples, "sampling_spans_total", decision="kept", policy="all") == 3
        assert value(samples, "dead_letters_total", reason="phoenix_rejected") == 0

    asyncio.run(scenario())


def test_aggregate_does_not_wait_for_phoenix() -> None:
    async def scenario() -> None:
        # No forward role at all: Phoenix is not on the path of the numbers.
        p = pipeline(forwarding=True)
        await p.feed(0, trace_payload(1, spans=2))
        p.clock.now_ms = T0_MS + WINDOW_MS + 30_000
        commits = await p.aggregate.tick(lambda partition: True)
        await p.finalize.tick()
        assert commits[0].offset == 1, "the commit waited for something besides Kafka"
        assert len(p.writer.written) == 2  # the agent's window and all agents'
        assert len(p.kept) == 1

    asyncio.run(scenario())


def accepting_forwarder(**options: Any) -> SpanForwarder:
    """A forwarder whose Phoenix stand-in accepts every batch (no batch is expected to fail)."""

    async def refused(batch: Any, result: Any) -> None:
        raise AssertionError("no batch is refused here")

    exporter = PhoenixExporter(
        traces_url="http://phoenix.test/v1/traces",
        transport=httpx.MockTransport(lambda request: httpx.Response(200)),
    )
    return SpanForwarder(exporter, default_project="default", on_failure=refused, **options)


def test_forward_lag_lost_and_bad_records_and_the_oldest_unforwarded_span() -> None:
    async def scenario() -> None:
        p = pipeline(forwarding=True, max_traces=100)
        for trace in (1, 2):
            await p.feed(0, trace_payload(trace, spans=2))
        # Nothing is sent before a batch of 100 is full: the spans wait in the forwarder.
        forward = ForwardStandIn(
            ForwardRole(accepting_forwarder(batch_spans=100)),
            highwater={0: 9, 1: 4},
            committed={0: 2, 1: 4},
        )
        role = forward.role
        role.assign(0, 2, 0)
        role.assign(1, 4, 0)
        minute_ago_ms = int(time.time() * 1000) - 60_000
        await role.handle(0, 2, minute_ago_ms, p.kept[0][1])
        await role.handle(0, 3, minute_ago_ms + 1_000, b"\x0a\xff")  # not a request
        await role.handle(0, 6, minute_ago_ms + 2_000, p.kept[1][1])  # 4 and 5 are gone
        samples = scrape(collector_for(p, forward=forward))
        assert value(samples, "forward_lag_messages", partition="0") == 7
        assert value(samples, "forward_lag_messages", partition="1") == 0
        assert value(samples, "forward_records_total") == 3
        assert value(samples, "forward_bad_records_total") == 1
        assert value(samples, "forward_records_lost_total") == 2
        assert value(samples, "phoenix_spans_pending") == 4
        assert value(samples, "forward_oldest_unforwarded_age_seconds") >= 60
        assert role.tick() == {0: Commit(2), 1: Commit(4)}, "committed past unsent spans"
        await role.forwarder.drain(5.0)
        assert role.tick() == {0: Commit(7), 1: Commit(4)}
        after = scrape(collector_for(p, forward=forward))
        assert value(after, "forward_oldest_unforwarded_age_seconds") == 0
        assert value(after, "phoenix_spans_accepted_total") == 4

    asyncio.run(scenario())


def test_sampling_decisions_are_counted_by_policy_and_early_ones_by_partition() -> None:
    async def scenario() -> None:
        policy = SamplingPolicy(probability=0.0, keep_errors=True, max_buffered_traces=2)
        p = pipeline(forwarding=True, sampling=policy)
        failed = [span_pb(trace=1, span=1, error=True), span_pb(trace=1, span=2, parent=1)]
        await p.feed(0, payload_of(failed, {"service.name": "agents"}))
        for trace in (2, 3, 4):  # three traces in a buffer of two: one decided early
            await p.feed(0, trace_payload(trace, spans=2))
        p.clock.now_ms += 10 * WINDOW_MS  # quiet and caught up: everything is decided
        await p.aggregate.tick(lambda partition: True)
        samples = scrape(collector_for(p))
        assert value(samples, "sampling_spans_total", decision="kept", policy="error") == 2
        assert value(samples, "sampling_spans_total", decision="dropped", policy="not_sampled") == 6
        assert value(samples, "sampling_spans_total", decision="kept", policy="probabilistic") == 0
        assert value(samples, "sampling_decided_early_traces_total", partition="0") == 1
        assert value(samples, "sampling_decided_on_error_traces_total", partition="0") == 1
        assert value(samples, "kept_spans_written_total") == 2, "only the failed trace is kept"
        assert [key for key, _ in p.kept] == [(1).to_bytes(16, "big")]

    asyncio.run(scenario())


def test_traces_decided_on_their_first_span_are_counted_by_partition() -> None:
    async def scenario() -> None:
        # Only the probability can keep a trace: each is decided as its first span comes.
        policy = SamplingPolicy(probability=0.0, keep_errors=False)
        p = pipeline(forwarding=True, sampling=policy, max_traces=10)
        for trace in (1, 2, 3):
            await p.feed(0, trace_payload(trace, spans=2))
        samples = scrape(collector_for(p))
        assert value(samples, "sampling_decided_at_once_traces_total", partition="0") == 3
        assert value(samples, "sampling_spans_total", decision="dropped", policy="not_sampled") == 6
        assert value(samples, "sampling_decided_early_traces_total", partition="0") == 0
        assert p.kept == []

    asyncio.run(scenario())


def test_consumer_lag_uncommitted_and_assignment() -> None:
    p = pipeline()
    positions = [
        ConsumerPosition("spans", 0, highwater=120, position=100),
        ConsumerPosition("spans", 1, highwater=None, position=7),  # no fetch yet: no lag
        ConsumerPosition("partials", 0, highwater=5, position=5),
    ]
    samples = scrape(
        collector_for(p, positions=lambda: positions, held=lambda topic, partition: 10 + partition)
    )
    assert value(samples, "consumer_lag", topic="spans", partition="0") == 20
    assert ("trace_processor_consumer_lag", (("partition", "1"), ("topic", "spans"))) not in samples
    assert value(samples, "consumer_lag", topic="partials", partition="0") == 0
    assert value(samples, "uncommitted_messages", topic="spans", partition="1") == 11
    assert value(samples, "assigned_partitions", topic="spans") == 2


def _exposed_names(text: str) -> set[str]:
    """Sample names every family can have, from its TYPE line (empty families included).

    A counter's TYPE line already names its ``_total`` sample."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if not name.startswith("trace_processor_"):
            continue
        if kind == "summary":
            names |= {f"{name}_count", f"{name}_sum"}
        elif kind == "info":
            names.add(f"{name}_info")
        else:
            names.add(name)
    return names


def test_the_documented_metrics_are_exactly_the_exposed_ones() -> None:
    async def make_forwarder() -> SpanForwarder:
        return accepting_forwarder()  # in a running loop, as the worker makes it

    forward = ForwardStandIn(ForwardRole(asyncio.run(make_forwarder())))
    registry = CollectorRegistry()
    alerted = pipeline(forwarding=True)
    # With alerting and its webhook on: their series too.
    alerted.finalize.alerting = Alerting(
        rules=DEFAULT_RULES, webhook=AlertWebhook("http://127.0.0.1:9/alerts")
    )
    registry.register(collector_for(alerted, forward=forward))
    exposed = _exposed_names(generate_latest(registry).decode())
    assert exposed == set(METRIC_NAMES)
    documented = set(re.findall(r"^\| `(trace_processor_\w+)`", DOCS.read_text(), re.MULTILINE))
    assert documented == set(METRIC_NAMES)


def test_carried_totals_add_what_a_replaced_object_had_counted() -> None:
    @dataclass
    class Stats:
        spans: int = 0

    totals = CarriedTotals(("spans",))
    a, b = Stats(5), Stats(0)
    totals.update({0: a})
    a.spans = 7  # counted after the last look
    totals.update({0: b})
    b.spans = 2
    assert totals.totals() == {0: {"spans": 9}}
    totals.update({})  # revoked for good: the total stays
    assert totals.totals() == {0: {"spans": 9}}


# -- readiness -----------------------------------------------------------------------------

UP = DependencyCheck("mlflow", True, "HTTP 200", 0.0)
DOWN = DependencyCheck("mlflow", False, "unreachable at http://x/health", 0.0)
SPANS0, PARTIALS0 = ("spans", 0), ("partials", 0)


@pytest.mark.parametrize(
    ("group", "dependency", "problems"),
    [
        (
            GroupState(False, False, False, frozenset(), frozenset()),
            UP,
            ["joining the consumer group: no partitions assigned yet"],
        ),
        (
            GroupState(True, True, False, frozenset({SPANS0}), frozenset()),
            UP,
            ["rebalancing: partitions are being reassigned"],
        ),
        (
            GroupState(True, False, False, frozenset({SPANS0, PARTIALS0}), frozenset({SPANS0})),
            UP,
            ["partials[0]: assigned, state not restored yet"],
        ),
        (
            GroupState(True, False, False, frozenset({SPANS0}), frozenset({SPANS0})),
            DOWN,
            ["mlflow: unreachable at http://x/health"],
        ),
        (
            GroupState(True, False, False, frozenset({SPANS0}), frozenset({SPANS0})),
            None,
            ["mlflow: not checked yet"],
        ),
        (GroupState(True, False, False, frozenset(), frozenset()), UP, []),  # standing by
        (
            GroupState(True, False, True, frozenset({SPANS0}), frozenset({SPANS0})),
            UP,
            ["stopping"],
        ),
    ],
)
def test_readiness_rules(
    group: GroupState, dependency: DependencyCheck | None, problems: list[str]
) -> None:
    report = evaluate_readiness(group, {"mlflow": dependency})
    assert list(report.problems) == problems
    assert report.ready is (not problems)


# -- registry and ports --------------------------------------------------------------------


def test_registry_lists_running_workers_and_drops_notes_of_dead_ones(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path / "workers")
    assert registry.workers() == []
    me = RegisteredWorker(
        "w/1", "http://127.0.0.1:9464", os.getpid(), socket.gethostname(), "a", 1.0
    )
    dead_pid = _pid_of_a_finished_process()
    dead = RegisteredWorker("w2", "http://127.0.0.1:9465", dead_pid, socket.gethostname(), "a", 1.0)
    elsewhere = RegisteredWorker("w3", "http://10.0.0.9:9464", dead_pid, "other-host", "a", 1.0)
    for worker in (me, dead, elsewhere):
        registry.register(worker)
    (registry.directory / "junk.json").write_text("{not json")
    assert sorted(w.worker_id for w in registry.workers()) == ["w/1", "w3"]
    assert not registry.path_of("w2").exists()
    registry.unregister("w/1")
    assert [w.worker_id for w in registry.workers()] == ["w3"]


def _pid_of_a_finished_process() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_taken_port_moves_the_server_to_the_next_free_one() -> None:
    first = bind_listener("127.0.0.1", 0)
    port = first.getsockname()[1]
    try:
        second = bind_listener("127.0.0.1", port, search=50)
        try:
            assert second.getsockname()[1] > port
        finally:
            second.close()
    finally:
        first.close()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9464"),
        ("::", "http://[::1]:9464"),
        ("10.1.2.3", "http://10.1.2.3:9464"),
    ],
)
def test_url_of_the_bound_address(host: str, url: str) -> None:
    assert url_of(host, 9464) == url


# -- the HTTP endpoints ----------------------------------------------------------------------


class FakeProbe:
    def __init__(self, name: str = "mlflow") -> None:
        self.name = name
        self.ok = False

    async def check(self) -> tuple[bool, str]:
        if self.ok:
            return True, "HTTP 200"
        return False, f"unreachable at http://{self.name}/health"

    async def close(self) -> None:
        pass


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned: set[TP] = set()
        self._read_offset: dict[TP, int] = {}
        self._committed_offset: dict[TP, int] = {}

    def assignment(self) -> set[TP]:
        return self.assigned

    def highwater(self, tp: TP) -> int:
        return 50


def test_readiness_flips_through_joining_rebalance_restore_and_dependencies(
    tmp_path: Path,
) -> None:
    settings = WorkerSettings(
        spans_topic="s",
        partials_topic="p",
        metrics_host="127.0.0.1",
        metrics_port=0,
        registry_dir=tmp_path,
        health_check_interval_s=0.02,
        worker_id="unit-worker",
    )
    p = pipeline(assigned=False)
    consumer = FakeConsumer()
    app = SimpleNamespace(
        consumer=consumer, rebalancing_count=0, rebalancing=False, should_stop=False, crashed=False
    )
    probe = FakeProbe()

    async def scenario() -> None:
        service = ObservabilityService(
            app=app,  # type: ignore[arg-type]
            settings=settings,
            aggregate=p.aggregate,
            finalize=p.finalize,
            forward=None,
            ledger=CommitLedger(),
            writer=None,
            probes=[probe],
        )
        await service.start()
        try:
            [note] = WorkerRegistry(tmp_path).workers()
            assert note.worker_id == "unit-worker" and note.url == service.url
            async with httpx.AsyncClient(base_url=note.url) as client:

                async def ready() -> tuple[int, list[str]]:
                    response = await client.get("/readyz")
                    return response.status_code, response.json()["problems"]

                assert (await client.get("/healthz")).status_code == 200
                code, problems = await ready()
                assert code == 503
                assert "joining the consumer group: no partitions assigned yet" in problems
                app.rebalancing_count, app.rebalancing = 1, True
                assert "rebalancing: partitions are being reassigned" in (await ready())[1]
                app.rebalancing = False
                consumer.assigned = {TP("s", 0), TP("p", 0)}
                consumer._committed_offset[TP("s", 0)] = 20  # nothing read yet
                assert "s[0]: assigned, state not restored yet" in (await ready())[1]
                p.aggregate.assign(0, None)  # what on_partitions_assigned does
                p.finalize.assign(0, None)
                assert await ready() == (503, ["mlflow: unreachable at http://mlflow/health"])
                probe.ok = True
                await asyncio.sleep(0.1)  # the next probe round
                assert await ready() == (200, [])
                metrics = (await client.get("/metrics")).text
                assert "trace_processor_ready 1.0" in metrics
                assert 'trace_processor_consumer_lag{partition="0",topic="s"} 30.0' in metrics
                status = (await client.get("/status")).json()
                assert status["assignment"] == {"p": [0], "s": [0]}
                assert status["ready"] is True
                assert status["roles"] == ["aggregate", "finalize", "forward"]
                assert status["forwarding"] is None, "no forward role runs here"
                app.should_stop = True
                assert await ready() == (503, ["stopping"])
        finally:
            await service.stop()
        assert WorkerRegistry(tmp_path).workers() == []
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"{note.url}/healthz")

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@pytest.mark.parametrize(
    ("roles", "probed"),
    [
        # Aggregate writes only to Kafka: Phoenix or MLflow down never makes it unready.
        (("aggregate",), []),
        (("finalize",), ["mlflow"]),
        (("forward",), ["phoenix"]),
        (("aggregate", "forward"), ["phoenix"]),
        (("aggregate", "finalize", "forward"), ["mlflow", "phoenix"]),
    ],
)
def test_readiness_probes_only_what_the_roles_run_write_to(
    roles: tuple[str, ...], probed: list[str]
) -> None:
    async def scenario() -> list[str]:
        p = pipeline(forwarding=True)
        forward = ForwardStandIn(ForwardRole(accepting_forwarder()))
        service = ObservabilityService(
            app=None,
            settings=WorkerSettings(roles=list(roles)),  # type: ignore[arg-type]
            aggregate=p.aggregate if "aggregate" in roles else None,
            finalize=p.finalize if "finalize" in roles else None,
            forward=forward if "forward" in roles else None,  # type: ignore[arg-type]
            ledger=None,
        )
        try:
            return sorted(service.dependencies.results)
        finally:
            await service.dependencies.close()
            await forward.role.forwarder.drain(1.0)

    assert asyncio.run(scenario()) == probed


def test_a_forward_only_worker_reports_its_forwarding_and_needs_only_phoenix(
    tmp_path: Path,
) -> None:
    settings = WorkerSettings(
        roles=["forward"],
        sampled_topic="t.sampled",
        registry_dir=tmp_path,
        worker_id="forwarder-1",
    )
    probe = FakeProbe("phoenix")

    async def scenario() -> None:
        p = pipeline(forwarding=True, max_traces=100)
        await p.feed(0, trace_payload(1, spans=3))
        forward = ForwardStandIn(
            ForwardRole(accepting_forwarder(batch_spans=100)),
            highwater={0: 10, 1: 3},
            committed={0: 4, 1: 3},
            joined=False,
        )
        service = ObservabilityService(
            app=None,
            settings=settings,
            aggregate=None,
            finalize=None,
            forward=forward,  # type: ignore[arg-type]
            ledger=None,
            probes=[probe],
        )
        assert service.readiness().problems == (
            "joining the consumer group: no partitions assigned yet",
            "phoenix: not checked yet",
        )
        forward.joined = True
        forward.role.assign(0, 4, 0)
        forward.role.assign(1, 3, 0)
        minute_ago_ms = int(time.time() * 1000) - 60_000
        await forward.role.handle(0, 4, minute_ago_ms, p.kept[0][1])
        await service.dependencies.check_all()
        assert service.readiness().problems == ("phoenix: unreachable at http://phoenix/health",)
        probe.ok = True
        await service.dependencies.check_all()
        status = service.status()
        assert status["ready"] is True, status["problems"]
        assert status["roles"] == ["forward"]
        assert status["assignment"] == {"t.sampled": [0, 1]}
        forwarding = status["forwarding"]
        assert forwarding["lag_messages"] == 6
        assert forwarding["spans_pending"] == 3
        assert forwarding["lost_records"] == 0
        assert forwarding["oldest_unforwarded_age_s"] >= 60
        samples = scrape(service.collector)
        assert value(samples, "forward_records_total") == 1
        assert value(samples, "consumer_lag", topic="t.sampled", partition="0") == 6
        assert not any(name.endswith("messages_consumed_total") for name, _ in samples)
        assert not any(name.endswith("windows_finalized_total") for name, _ in samples)
        await forward.role.forwarder.drain(1.0)

    asyncio.run(scenario())
