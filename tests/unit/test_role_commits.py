"""What each role may commit, and when: the bookkeeping behind "exactly once", without Kafka.

Every role commits by one rule (DESIGN.md, rule 4): an offset is safe once every message
before it is out of the role's hands. ``PartitionOffsets`` turns a role's holds into that
offset; the roles say what they hold. Here the roles get the bytes Kafka would deliver and
stand-ins for what they write to (in-memory senders, an MLflow writer, a Phoenix that can hold
its answers and its writes), and the tests check the offsets they would have the consumer
commit, and what a worker that restarts from such a commit sends again.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.core.aggregate import WindowAggregate
from processor.core.calendar import SeriesDay
from processor.core.rollup import (
    ALL_AGENTS,
    PartialRollup,
    PartitionProgress,
    SeriesKey,
    parse_stage_record,
)
from processor.core.sampling import SamplingPolicy
from processor.core.semconv import ExtractionConfig
from processor.core.spans import SpanOrigin
from processor.core.windows import window_start
from processor.errors import InvalidInput, RetryableExportError
from processor.sinks.phoenix import PhoenixExporter, RetryPolicy
from processor.worker.aggregate import AggregateRole, DeadLetter
from processor.worker.finalize import FinalizeRole, finalized_until
from processor.worker.forward import ForwardRole
from processor.worker.kept_spans import (
    KeptSpan,
    kept_span_records,
    spans_of_record,
    wire_origin,
)
from processor.worker.offsets import Commit, PartitionOffsets
from processor.worker.phoenix_delivery import ForwardedBatch, SpanForwarder
from tests.unit.core.spanbuilder import T0_MS, attributes, payload_of, sid, span_pb, tid

T = TypeVar("T")
WINDOW_MS = 60_000
LATENESS_MS = 1_000


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=30))


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# == PartitionOffsets: the one place a safe offset is computed ===============================

# A step and what it should give: ("assign", partition, committed, resume_at) -> None,
# ("accept", partition, offset) -> handle it?, ("safe", partition, holds) -> offset to commit,
# ("revoke", partitions) -> None.
Step = tuple[tuple[Any, ...], Any]


def assign(partition: int, committed: int | None, resume_at: int | None = None) -> Step:
    return ("assign", partition, committed, resume_at), None


def accept(partition: int, offset: int, handled: bool) -> Step:
    return ("accept", partition, offset), handled


def accepts(partition: int, offsets: Iterable[int]) -> list[Step]:
    return [accept(partition, offset, True) for offset in offsets]


def safe(partition: int, *holds: int | None, commits: int | None) -> Step:
    return ("safe", partition, holds), commits


def revoke(*partitions: int) -> Step:
    return ("revoke", partitions), None


OFFSET_CASES: dict[str, list[Step]] = {
    "no commit yet: nothing to commit before the first message": [
        assign(0, None),
        safe(0, commits=None),
        *accepts(0, [0, 1]),
        safe(0, commits=2),
    ],
    "the committed offset is safe before anything is read": [
        assign(0, 40),
        safe(0, commits=40),
        *accepts(0, [40]),
        safe(0, commits=41),
    ],
    "a hold keeps the commit at the oldest message still needed": [
        assign(0, 0),
        *accepts(0, range(5)),
        safe(0, 2, commits=2),
        safe(0, 3, None, commits=3),
        safe(0, commits=5),
    ],
    "the smallest of several holds wins": [
        assign(0, 0),
        *accepts(0, range(5)),
        safe(0, 4, 1, 3, commits=1),
    ],
    "a hold never moves the commit back": [
        assign(0, 0),
        *accepts(0, range(5)),
        safe(0, commits=5),
        safe(0, 2, commits=5),
        *accepts(0, [5, 6]),
        safe(0, 4, commits=5),
        safe(0, 6, commits=6),
    ],
    "a hold past the next offset does not push the commit forward": [
        assign(0, 0),
        *accepts(0, [0, 1]),
        safe(0, 10, commits=2),
    ],
    "redeliveries below the next offset are skipped, each time": [
        assign(0, 5),
        accept(0, 3, False),
        accept(0, 5, True),
        accept(0, 5, False),
        accept(0, 4, False),
        accept(0, 6, True),
        safe(0, commits=7),
    ],
    "a gap is handled and the next offset jumps over it": [
        assign(0, 0),
        accept(0, 0, True),
        accept(0, 5, True),
        accept(0, 3, False),
        safe(0, commits=6),
    ],
    "reading resumes where the role's state says": [
        assign(0, 10, resume_at=7),
        safe(0, commits=7),
        accept(0, 6, False),
        accept(0, 7, True),
        safe(0, commits=8),
    ],
    "a revoked partition is ignored until it is assigned again": [
        assign(0, 0),
        accept(0, 0, True),
        revoke(0),
        accept(0, 1, False),
        safe(0, commits=None),
        assign(0, 1),
        accept(0, 1, True),
        safe(0, commits=2),
    ],
    "a new assignment starts at its own commit, even below the last one": [
        assign(0, 0),
        *accepts(0, range(10)),
        safe(0, commits=10),
        revoke(0),
        assign(0, 4),  # this worker's last commit did not get through
        safe(0, commits=4),
        accept(0, 4, True),
    ],
    "partitions are independent": [
        assign(0, 0),
        assign(1, 100),
        accept(0, 0, True),
        *accepts(1, [100, 101]),
        safe(0, commits=1),
        safe(1, 100, commits=100),
        revoke(1),
        safe(0, commits=1),
        accept(1, 102, False),
        accept(0, 1, True),
    ],
}


def _play(offsets: PartitionOffsets, steps: Sequence[Step]) -> list[Any]:
    results: list[Any] = []
    for (verb, *args), _ in steps:
        if verb == "assign":
            offsets.assign(*args)
            results.append(None)
        elif verb == "accept":
            results.append(offsets.accept(*args))
        elif verb == "safe":
            partition, holds = args
            results.append(offsets.safe(partition, *holds))
        else:
            offsets.revoke(*args)
            results.append(None)
    return results


@pytest.mark.parametrize("steps", OFFSET_CASES.values(), ids=OFFSET_CASES.keys())
def test_partition_offsets(steps: list[Step]) -> None:
    offsets = PartitionOffsets(logging.getLogger("offsets-test"), "aggregate")
    assert _play(offsets, steps) == [expected for _, expected in steps]


def test_revoke_all_gives_up_every_partition() -> None:
    offsets = PartitionOffsets(logging.getLogger("offsets-test"), "forward")
    _play(offsets, [assign(0, 0), assign(3, 9), *accepts(3, [9])])
    assert offsets.assigned == {0, 3}
    offsets.revoke_all()
    assert offsets.assigned == frozenset()
    assert not offsets.accept(3, 10)
    assert offsets.safe(3) is None


@settings(max_examples=200, deadline=None)
@given(
    committed=st.none() | st.integers(0, 20),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("accept"), st.integers(0, 40)),
            st.tuples(st.just("safe"), st.lists(st.none() | st.integers(0, 40), max_size=3)),
        ),
        max_size=40,
    ),
)
def test_the_safe_offset_never_moves_back_and_never_passes_a_hold(
    committed: int | None, ops: list[tuple[str, Any]]
) -> None:
    offsets = PartitionOffsets(logging.getLogger("offsets-test"), "aggregate")
    offsets.assign(0, committed)
    next_offset, last_safe = committed, committed
    for verb, arg in ops:
        if verb == "accept":
            handled = offsets.accept(0, arg)
            assert handled == (next_offset is None or arg >= next_offset)
            if handled:
                next_offset = arg + 1
            continue
        result = offsets.safe(0, *arg)
        if next_offset is None:
            assert result is None
            continue
        wanted = min([next_offset, *(hold for hold in arg if hold is not None)])
        # The hold, unless an offset at or past it was returned before: that one stands.
        assert result == (wanted if last_safe is None else max(wanted, last_safe))
        assert result is not None and result <= next_offset
        last_safe = result


# == ForwardRole: commit once Phoenix has written the spans =================================

PHOENIX_URL = "http://phoenix.test/v1/traces"
_span_ids = iter(range(1, 1 << 40))


class HoldingPhoenix:
    """Phoenix as the forwarder meets it: OTLP/HTTP exports, and GraphQL questions about which
    spans are written. While ``answering`` is clear an export gets no answer yet. With
    ``writing`` off an export is accepted (200, as Phoenix answers before it writes) but its
    spans are written only when the test calls ``write``: a Phoenix with a queue behind."""

    def __init__(self, *, writing: bool = True) -> None:
        self.answering = asyncio.Event()
        self.answering.set()
        self.writing = writing
        self.exports = 0
        self.accepted: list[bytes] = []  # span ids, in the order Phoenix answered 200
        self.written: Counter[bytes] = Counter()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/graphql":
            variables = json.loads(request.content)["variables"]
            return httpx.Response(
                200,
                json={
                    "data": {
                        name: {"id": "U3Bhbjox"} if bytes.fromhex(span_id) in self.written else None
                        for name, span_id in variables.items()
                    }
                },
            )
        self.exports += 1
        await self.answering.wait()
        body = ExportTraceServiceRequest.FromString(gzip.decompress(request.content))
        ids = [s.span_id for rs in body.resource_spans for ss in rs.scope_spans for s in ss.spans]
        self.accepted.extend(ids)
        if self.writing:
            self.written.update(ids)
        return httpx.Response(200)

    def write(self, span_ids: Iterable[bytes] | None = None) -> None:
        """Write the given accepted spans (default: every one accepted so far)."""
        self.written.update(self.accepted if span_ids is None else span_ids)


def forward_role(phoenix: HoldingPhoenix) -> ForwardRole:
    async def refused(batch: ForwardedBatch, result: Any) -> None:
        raise AssertionError(f"Phoenix refused nothing here, got {result}")

    exporter = PhoenixExporter(traces_url=PHOENIX_URL, transport=httpx.MockTransport(phoenix))
    forwarder = SpanForwarder(
        exporter,
        default_project="default",
        on_failure=refused,
        batch_spans=1,  # one record, one request: the test says which one Phoenix writes
        batch_interval_s=60.0,
        max_in_flight=16,
        retry=RetryPolicy(initial_s=0.001, max_s=0.005),
        confirm_interval_s=0.005,
        # A span written while an earlier one waits is not a reason to resend here.
        overtake_grace_s=600.0,
        confirm_timeout_s=600.0,
    )
    return ForwardRole(forwarder)


@dataclass
class SampledRecord:
    """A record of the sampled topic, as aggregate writes it, with its span ids."""

    value: bytes
    span_ids: list[bytes]


def sampled_record(spans: int = 1, *, trace: int = 7) -> SampledRecord:
    pbs = [span_pb(trace=trace, span=next(_span_ids)) for _ in range(spans)]
    ((_, value),) = kept_span_records([kept_span(tid(trace), ORIGIN_A, pb) for pb in pbs])
    return SampledRecord(value, [pb.span_id for pb in pbs])


async def finish(role: ForwardRole) -> None:
    await role.forwarder.drain(5.0)


@pytest.mark.parametrize(
    ("written", "commit"),
    [
        ((), 0),  # accepted (2xx) is not written: nothing may be committed
        ((0,), 1),
        ((1,), 0),  # written out of order: offset 0 still waits
        ((0, 1), 2),
        ((0, 2), 1),
        ((1, 2), 0),
        ((0, 1, 2), 3),
    ],
)
def test_forward_commits_only_past_what_phoenix_has_written(
    written: tuple[int, ...], commit: int
) -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix(writing=False)
        role = forward_role(phoenix)
        role.assign(0, None, 0)
        records = [sampled_record() for _ in range(3)]
        for offset, record in enumerate(records):
            await role.handle(0, offset, T0_MS, record.value)
        await until(lambda: len(phoenix.accepted) == 3, "Phoenix to accept every batch")
        phoenix.write(span for offset in written for span in records[offset].span_ids)
        forwarder = role.forwarder
        await until(lambda: forwarder.stats.accepted_batches == len(written), "the writes seen")
        assert role.tick() == {0: Commit(commit)}
        phoenix.write()
        await until(lambda: forwarder.pending_offset(0) is None, "every write seen")
        assert role.tick() == {0: Commit(3)}
        await finish(role)

    run(scenario)


def test_forward_holds_the_commit_while_phoenix_has_not_answered() -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix()
        phoenix.answering.clear()
        role = forward_role(phoenix)
        role.assign(0, 10, 0)
        for offset in (10, 11):
            await role.handle(0, offset, T0_MS, sampled_record(2).value)
        await until(lambda: phoenix.exports == 4, "a request per span out")
        assert role.tick() == {0: Commit(10)}
        assert role.forwarder.pending_spans() == 4
        phoenix.answering.set()
        await until(lambda: role.forwarder.pending_offset(0) is None, "the answers")
        assert role.tick() == {0: Commit(12)}
        assert role.counters.records == 2 and role.counters.spans == 4
        await finish(role)

    run(scenario)


@pytest.mark.parametrize(
    ("redelivered", "skipped"),
    [
        ((2, 3), 0),  # the consumer resumes at the commit
        ((0, 1, 2, 3), 2),  # a fetch from before the commit: seen already, skipped
    ],
)
def test_forward_replays_from_its_commit_after_a_revocation(
    redelivered: tuple[int, ...], skipped: int
) -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix(writing=False)
        role = forward_role(phoenix)
        role.assign(0, None, 0)
        records = [sampled_record(trace=t) for t in range(4)]
        for offset, record in enumerate(records):
            await role.handle(0, offset, T0_MS, record.value)
        await until(lambda: len(phoenix.accepted) == 4, "every batch accepted")
        phoenix.write(records[0].span_ids + records[1].span_ids)
        await until(lambda: role.forwarder.stats.accepted_batches == 2, "two batches written")
        assert role.tick() == {0: Commit(2)}
        role.revoke([0])
        assert role.tick() == {}, "a partition no longer ours is not committed"
        assert role.assigned == frozenset()
        role.assign(0, 2, 0)  # back again, at the commit
        for offset in redelivered:
            await role.handle(0, offset, T0_MS, records[offset].value)
        assert role.counters.skipped_records == skipped
        assert role.tick() == {0: Commit(2)}, "spans sent before the revocation counted"
        await until(lambda: len(phoenix.accepted) == 6, "records 2 and 3 sent again")
        phoenix.write()
        await until(lambda: role.forwarder.pending_offset(0) is None, "the replay written")
        assert role.tick() == {0: Commit(4)}
        every_span = {span for record in records for span in record.span_ids}
        assert set(phoenix.written) == every_span
        await finish(role)

    run(scenario)


@pytest.mark.parametrize(
    ("committed", "log_start", "offsets", "lost", "commit"),
    [
        (None, 0, (0, 1, 2), 0, 3),
        (5, 0, (5, 6), 0, 7),
        (3, 10, (10, 11), 7, 12),  # retention removed 3..9 before they were read
        (None, 0, (0, 4, 5), 3, 6),  # 1..3 gone between two fetches
        (5, 8, (8, 12), 3 + 3, 13),
        (0, 0, (0, 1, 0, 1, 2), 0, 3),  # a redelivery is not a loss
    ],
)
def test_forward_counts_records_removed_by_retention_as_lost(
    committed: int | None, log_start: int, offsets: tuple[int, ...], lost: int, commit: int
) -> None:
    async def scenario() -> None:
        role = forward_role(HoldingPhoenix())
        role.assign(0, committed, log_start)
        for offset in offsets:
            await role.handle(0, offset, T0_MS, sampled_record().value)
        await until(lambda: role.forwarder.pending_offset(0) is None, "every span written")
        assert role.counters.lost_records == lost
        assert role.tick() == {0: Commit(commit)}
        await finish(role)

    run(scenario)


def test_forward_commits_past_records_retention_removed_before_reading_any() -> None:
    async def scenario() -> None:
        role = forward_role(HoldingPhoenix())
        role.assign(0, 3, 10)
        assert role.counters.lost_records == 7
        assert role.tick() == {0: Commit(10)}
        await finish(role)

    run(scenario)


GOOD, BAD, EMPTY = "good", "bad", "empty"


@pytest.mark.parametrize(
    ("kinds", "bad", "spans"),
    [
        ((GOOD, BAD, GOOD), 1, 2),
        ((BAD,), 1, 0),
        ((BAD, BAD, GOOD), 2, 1),
        ((EMPTY, GOOD), 0, 1),  # an empty export request: nothing to forward
    ],
)
def test_forward_counts_bad_records_and_commits_past_them(
    kinds: tuple[str, ...], bad: int, spans: int
) -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix()
        role = forward_role(phoenix)
        role.assign(0, None, 0)
        values: dict[str, Callable[[], bytes]] = {
            GOOD: lambda: sampled_record().value,
            BAD: lambda: b"\x0a\xff",
            EMPTY: bytes,
        }
        for offset, kind in enumerate(kinds):
            await role.handle(0, offset, T0_MS, values[kind]())
        await until(lambda: role.forwarder.pending_offset(0) is None, "the good ones written")
        assert role.counters.bad_records == bad
        assert role.counters.records == len(kinds)
        assert len(phoenix.written) == spans
        assert role.tick() == {0: Commit(len(kinds))}
        await finish(role)

    run(scenario)


def test_forward_ignores_a_partition_it_does_not_hold() -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix()
        role = forward_role(phoenix)
        role.assign(0, None, 0)
        await role.handle(1, 0, T0_MS, sampled_record().value)  # read before a rebalance
        assert role.counters.skipped_records == 1
        assert role.forwarder.pending_spans() == 0
        assert phoenix.exports == 0
        assert role.tick() == {}
        await finish(role)

    run(scenario)


def test_the_oldest_pending_record_is_the_oldest_not_yet_written() -> None:
    async def scenario() -> None:
        phoenix = HoldingPhoenix(writing=False)
        role = forward_role(phoenix)
        role.assign(0, None, 0)
        role.assign(1, None, 0)
        assert role.oldest_pending_ms() is None
        first, second, other = sampled_record(), sampled_record(), sampled_record()
        await role.handle(0, 0, 5_000, first.value)
        await role.handle(0, 1, 6_000, second.value)
        await role.handle(1, 0, 5_500, other.value)
        await until(lambda: len(phoenix.accepted) == 3, "every batch accepted")
        seen: list[int | None] = [role.oldest_pending_ms()]
        stats = role.forwarder.stats
        for written, record in enumerate((first, other, second), start=1):
            phoenix.write(record.span_ids)
            await until(lambda: stats.accepted_batches == written, "the write")  # noqa: B023
            role.tick()
            seen.append(role.oldest_pending_ms())
        assert seen == [5_000, 5_500, 6_000, None]
        await finish(role)

    run(scenario)


# == AggregateRole: commit once partials and kept spans are handed to Kafka =================


@dataclass
class Outbox:
    """What aggregate hands to the producer: partial, kept-span and dead-letter records.

    ``hold_kept`` / ``hold_letters`` cleared: that send waits (a full producer buffer)."""

    partials: list[tuple[bytes, bytes, int | None]] = field(default_factory=list)
    kept: list[tuple[bytes, bytes, int | None]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    hold_kept: asyncio.Event | None = None
    hold_letters: asyncio.Event | None = None
    waiting: int = 0

    async def send_partial(self, key: bytes, value: bytes, partition: int | None) -> None:
        self.partials.append((key, value, partition))

    async def send_kept(self, key: bytes, value: bytes, partition: int | None) -> None:
        await self._wait(self.hold_kept)
        self.kept.append((key, value, partition))

    async def send_dead_letter(self, letter: DeadLetter) -> None:
        await self._wait(self.hold_letters)
        self.letters.append(letter)

    async def _wait(self, gate: asyncio.Event | None) -> None:
        if gate is not None and not gate.is_set():
            self.waiting += 1
            await gate.wait()
            self.waiting -= 1

    def partial_records(self) -> dict[bytes, bytes]:
        """The partials topic as finalize reads it: the latest record per key (compacted)."""
        return {
            key: value
            for key, value, _ in self.partials
            if isinstance(parse_stage_record(value), PartialRollup)
        }

    def windows_sent(self) -> set[int]:
        return {
            record.window_start_ms
            for _, value, _ in self.partials
            if isinstance(record := parse_stage_record(value), PartialRollup)
        }

    def kept_span_ids(self) -> set[bytes]:
        return {span.span_id for _, value, _ in self.kept for _, span in spans_of_record(value)}


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def aggregate_role(
    outbox: Outbox, clock: Clock, *, sampling: SamplingPolicy | None = None
) -> AggregateRole:
    return AggregateRole(
        window_size_ms=WINDOW_MS,
        allowed_lateness_ms=LATENESS_MS,
        idle_timeout_ms=5_000,
        max_traces=1_000,
        max_series_per_window=100,
        partials_partitions=2,
        extraction=ExtractionConfig(),
        sampling=sampling,
        send_partial=outbox.send_partial,
        send_kept=outbox.send_kept,
        send_dead_letter=outbox.send_dead_letter,
        clock=clock,
    )


def never_caught_up(partition: int) -> bool:
    return False


def caught_up(partition: int) -> bool:
    return True


def agent_trace(
    trace: int,
    end_ms: int,
    *,
    children: int = 1,
    error: bool = False,
    duration_ms: int = 100,
    attrs: dict[str, Any] | None = None,
) -> list[Span]:
    """A root span of agent 'planner' ending at ``end_ms`` and ``children`` children."""
    root = span_pb(
        trace=trace,
        span=trace * 100,
        start_ms=end_ms - duration_ms,
        duration_ms=duration_ms,
        error=error,
        attrs={"agent.name": "planner", **(attrs or {})},
    )
    return [root] + [
        span_pb(trace=trace, span=trace * 100 + n, parent=trace * 100, start_ms=end_ms - 20)
        for n in range(1, children + 1)
    ]


def message(*spans: Span) -> bytes:
    return payload_of(spans, {"service.name": "agents"})


TRACES = {
    "failed": agent_trace(1, T0_MS + 1_000, error=True),
    "slow": agent_trace(2, T0_MS + 3_000, duration_ms=2_000),
    "flagged": agent_trace(3, T0_MS + 4_000, attrs={"session.flagged": True}),
    "plain": agent_trace(4, T0_MS + 5_000),
}


@pytest.mark.parametrize(
    ("policy", "reasons"),
    [
        (SamplingPolicy(probability=0.0, keep_errors=True), {"failed": "error"}),
        (
            SamplingPolicy(probability=0.0, keep_errors=False, latency_threshold_ms=1_000),
            {"slow": "latency"},
        ),
        (
            SamplingPolicy(
                probability=0.0,
                keep_errors=False,
                attribute_matches={"session.flagged": frozenset({"true"})},
            ),
            {"flagged": "attribute"},
        ),
        (
            SamplingPolicy(probability=0.0, keep_errors=True, latency_threshold_ms=1_000),
            {"failed": "error", "slow": "latency"},
        ),
        (
            SamplingPolicy(probability=1.0, keep_errors=False),
            dict.fromkeys(TRACES, "probabilistic"),
        ),
    ],
    ids=["errors", "latency", "attribute", "errors+latency", "everything"],
)
def test_kept_spans_become_sampled_records_keyed_by_trace_saying_why(
    policy: SamplingPolicy, reasons: dict[str, str]
) -> None:
    async def scenario() -> Outbox:
        outbox, clock = Outbox(), Clock(T0_MS + 6_000)
        role = aggregate_role(outbox, clock, sampling=policy)
        role.assign(0, None)
        for offset, spans in enumerate(TRACES.values()):
            await role.handle(0, offset, None, message(*spans), {})
        clock.now_ms += 10 * WINDOW_MS  # quiet and caught up: every trace is decided
        await role.tick(caught_up)
        assert role.counters.kept_records == len(outbox.kept)
        return outbox

    outbox = run(scenario)
    kept = {TRACES[name][0].trace_id: reason for name, reason in reasons.items()}
    assert sorted(key for key, _, _ in outbox.kept) == sorted(kept), "one record per kept trace"
    for key, value, partition in outbox.kept:
        assert partition is None, "the producer places the record by its key, the trace id"
        spans = [span for _, span in spans_of_record(value)]
        [name] = [n for n, trace in TRACES.items() if trace[0].trace_id == key]
        assert sorted(s.span_id for s in spans) == sorted(s.span_id for s in TRACES[name])
        for span in spans:
            assert span.trace_id == key
            marks = [a.value.string_value for a in span.attributes if a.key == "sampling.reason"]
            assert marks == [kept[key]]


def test_without_forwarding_nothing_is_written_to_the_sampled_topic() -> None:
    async def scenario() -> None:
        outbox, clock = Outbox(), Clock(T0_MS + 6_000)
        role = AggregateRole(
            window_size_ms=WINDOW_MS,
            allowed_lateness_ms=LATENESS_MS,
            idle_timeout_ms=5_000,
            max_traces=1_000,
            max_series_per_window=100,
            partials_partitions=1,
            extraction=ExtractionConfig(),
            sampling=None,
            send_partial=outbox.send_partial,
            send_kept=None,
            send_dead_letter=outbox.send_dead_letter,
            clock=clock,
        )
        role.assign(0, None)
        await role.handle(0, 0, None, message(*TRACES["failed"]), {})
        clock.now_ms += 10 * WINDOW_MS
        commits = await role.tick(caught_up)
        assert outbox.kept == [] and role.counters.kept_spans == 0
        assert commits[0].offset == 1
        assert len(outbox.partial_records()) == 2  # the agent's and the all-agents series'

    run(scenario)


# A partition's traffic over three windows: traces 10 s apart, every third failed, and from
# the fourth on a child that arrives one message after its trace (so assembly waits for it).
def workload() -> list[tuple[bytes, int]]:
    """(message, the clock when it arrives) per offset."""
    messages: list[tuple[bytes, int]] = []
    late_child: Span | None = None
    for n in range(1, 19):
        end_ms = T0_MS + n * 10_000
        spans = agent_trace(n, end_ms, error=n % 3 == 0)
        if late_child is not None:
            spans.append(late_child)
        late_child = None
        if n >= 4:
            late_child = span_pb(
                trace=n, span=n * 100 + 9, parent=n * 100, start_ms=end_ms - 50, duration_ms=40
            )
        messages.append((message(*spans), end_ms + 500))
    return messages


WORKLOAD = workload()
SAMPLING = SamplingPolicy(probability=0.5, keep_errors=True, decision_grace_ms=500)
FLUSH_MS = T0_MS + 30 * WINDOW_MS  # long after the last message: every window closes


@dataclass
class AggregateRun:
    outbox: Outbox
    commits: list[Commit]  # what each tick returned for partition 0
    role: AggregateRole


async def aggregate_run(
    messages: Sequence[tuple[bytes, int]],
    *,
    tick_every: int = 1,
    outbox: Outbox | None = None,
    resume: Commit | None = None,
    redelivered: int = 0,
    flush: bool = True,
    on_tick: Callable[[Commit, Outbox], None] | None = None,
) -> AggregateRun:
    """Feed ``messages`` to a fresh aggregate role on partition 0, ticking after every
    ``tick_every``-th message, then (``flush``) let the partition go idle so that every
    window closes. ``resume``: the role is assigned at that commit, and the consumer re-reads
    from ``redelivered`` messages before it."""
    outbox = outbox if outbox is not None else Outbox()
    clock = Clock(T0_MS)
    role = aggregate_role(outbox, clock, sampling=SAMPLING)
    role.assign(0, resume.offset if resume else None, resume.metadata if resume else "")
    start = max(0, resume.offset - redelivered) if resume else 0
    commits: list[Commit] = []

    async def tick(caught: Callable[[int], bool]) -> None:
        commit = (await role.tick(caught)).get(0)
        if commit is not None:
            commits.append(commit)
            if on_tick is not None:
                on_tick(commit, outbox)

    for offset in range(start, len(messages)):
        value, now_ms = messages[offset]
        clock.now_ms = now_ms
        await role.handle(0, offset, None, value, {})
        if (offset + 1) % tick_every == 0:
            await tick(never_caught_up)
    if flush:
        clock.now_ms = FLUSH_MS
        for _ in range(2):  # the second tick commits what the first one sent
            await tick(caught_up)
    return AggregateRun(outbox, commits, role)


@functools.cache
def clean_run() -> AggregateRun:
    """The run without a crash, that the others are compared with."""
    return run(lambda: aggregate_run(WORKLOAD))


def test_the_clean_run_closes_every_window_keeps_spans_and_commits_everything() -> None:
    # What the crash tests below compare with; a vacuous run would let them pass for nothing.
    clean = clean_run()
    assert clean.outbox.windows_sent() == {T0_MS + n * WINDOW_MS for n in range(4)}
    assert len(clean.outbox.partial_records()) == 2 * 4  # the agent's and all agents', per window
    assert 0 < len(clean.outbox.kept_span_ids()) < clean.role.counters.spans
    assert clean.commits[-1].offset == len(WORKLOAD)
    assert [c.offset for c in clean.commits] == sorted(c.offset for c in clean.commits)


def _message_spans(value: bytes) -> list[Span]:
    request = ExportTraceServiceRequest.FromString(value)
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.mark.parametrize("tick_every", [1, 3, 7])
def test_the_commit_never_passes_a_message_whose_spans_are_not_sent(tick_every: int) -> None:
    kept_in_the_end = clean_run().outbox.kept_span_ids()
    checked: list[int] = []

    def check(commit: Commit, outbox: Outbox) -> None:
        windows, kept = outbox.windows_sent(), outbox.kept_span_ids()
        for offset in range(commit.offset):
            for span in _message_spans(WORKLOAD[offset][0]):
                end_ms = span.end_time_unix_nano // 1_000_000
                assert window_start(end_ms, WINDOW_MS) in windows, (commit, offset, "partial")
                if span.span_id in kept_in_the_end:
                    assert span.span_id in kept, (commit, offset, "kept span")
        checked.append(commit.offset)

    run(lambda: aggregate_run(WORKLOAD, tick_every=tick_every, on_tick=check))
    assert checked[-1] == len(WORKLOAD)
    assert any(0 < offset < len(WORKLOAD) for offset in checked), "only trivial commits seen"


# Where the worker dies: after that many messages handled, its last commit being the one the
# last tick before returned (or none). A tick every 2 messages, so some crashes lose messages
# handled after the last tick.
CRASH_POINTS = [1, 4, 7, 9, 12, 15, 18]


@pytest.mark.parametrize("redelivered", [0, 2])
@pytest.mark.parametrize("crash_after", CRASH_POINTS)
def test_a_crash_and_replay_from_the_commit_sends_the_same_partials_and_every_kept_span(
    crash_after: int, redelivered: int
) -> None:
    async def scenario() -> tuple[AggregateRun, AggregateRun]:
        first = await aggregate_run(WORKLOAD[:crash_after], tick_every=2, flush=False)
        last = first.commits[-1] if first.commits else None
        # The partials and kept spans the dead worker sent are in Kafka; the replay adds to them.
        replayed = Outbox(partials=list(first.outbox.partials), kept=list(first.outbox.kept))
        second = await aggregate_run(
            WORKLOAD, tick_every=2, outbox=replayed, resume=last, redelivered=redelivered
        )
        return first, second

    first, second = run(scenario)
    clean_outbox = clean_run().outbox
    clean = clean_outbox.partial_records()
    before_crash = len(first.outbox.partials)
    for key, value, _ in second.outbox.partials[before_crash:]:
        if key in clean:
            assert value == clean[key], "a replayed partial differs from its twin"
    assert second.outbox.partial_records() == clean
    assert second.outbox.kept_span_ids() == clean_outbox.kept_span_ids()
    resumed_at = first.commits[-1].offset if first.commits else 0
    assert second.role.counters.skipped_messages == min(redelivered, resumed_at)
    assert second.commits[-1].offset == len(WORKLOAD)


def test_a_commit_carries_the_checkpoint_a_replay_needs(caplog: pytest.LogCaptureFixture) -> None:
    first = run(lambda: aggregate_run(WORKLOAD[:9], tick_every=3, flush=False))
    commit = first.commits[-1]
    assert 0 < commit.offset < 9
    assert commit.metadata and len(commit.metadata.encode()) < 4096
    # Without it a replay starts from nothing and may resend a window incomplete: said loudly.
    with caplog.at_level(logging.ERROR, logger="processor.worker.aggregate"):
        aggregate_role(Outbox(), Clock(T0_MS)).assign(0, commit.offset, "")
    assert any("without a checkpoint" in r.getMessage() for r in caplog.records)


# Kafka's producer may make a send wait (its buffer is full, or it has no metadata for the
# topic yet), and the worker's tick timer runs while the aggregate agent waits there.


def test_a_tick_while_a_dead_letter_is_being_sent_does_not_commit_past_its_message() -> None:
    async def scenario() -> tuple[int, int]:
        outbox, clock = Outbox(), Clock(T0_MS + 2_000)
        role = aggregate_role(outbox, clock)
        role.assign(0, None)
        await role.handle(0, 0, None, message(*agent_trace(1, T0_MS + 1_000)), {})
        clock.now_ms = T0_MS + 10 * WINDOW_MS  # idle: every window closes
        await role.tick(caught_up)
        assert (await role.tick(caught_up))[0].offset == 1
        # Offset 1: one good span, and one from a clock an hour ahead (a dead letter).
        good = span_pb(trace=2, span=1, start_ms=clock.now_ms - 200)
        ahead = span_pb(trace=3, span=1, start_ms=clock.now_ms + 3_600_000)
        outbox.hold_letters = asyncio.Event()
        handling = asyncio.create_task(role.handle(0, 1, None, message(good, ahead), {}))
        await until(lambda: outbox.waiting == 1, "the dead letter to wait")
        during = (await role.tick(never_caught_up))[0].offset
        outbox.hold_letters.set()
        await handling
        after = (await role.tick(never_caught_up))[0].offset
        return during, after

    during, after = run(scenario)
    # Offset 1's good span is in an open window: a crash now must replay offset 1.
    assert (during, after) == (1, 1)


def test_a_tick_while_kept_spans_are_being_sent_does_not_commit_past_their_messages() -> None:
    async def scenario() -> int:
        outbox, clock = Outbox(), Clock(T0_MS + 2_000)
        slow = SamplingPolicy(probability=0.0, keep_errors=False, latency_threshold_ms=1)
        role = aggregate_role(outbox, clock, sampling=slow)
        role.assign(0, None)
        # A slow trace waits for its decision (root end plus the grace) ...
        await role.handle(0, 0, None, message(*agent_trace(1, T0_MS + 1_000)), {})
        assert (await role.tick(never_caught_up))[0].offset == 0
        # ... which falls when a span two windows later moves the watermark: its spans are
        # taken to be sent while offset 1 is handled, and that send waits.
        clock.now_ms = T0_MS + 2 * WINDOW_MS + 1_000
        outbox.hold_kept = asyncio.Event()
        later = message(*agent_trace(2, T0_MS + 2 * WINDOW_MS + 500))
        handling = asyncio.create_task(role.handle(0, 1, None, later, {}))
        await until(lambda: outbox.waiting == 1, "the kept spans to wait")
        during = (await role.tick(never_caught_up))[0].offset
        outbox.hold_kept.set()
        await handling
        assert len(outbox.kept) == 1
        return during

    # Trace 1's kept spans came in offset 0 and are not handed to the producer yet.
    assert run(scenario) == 0


# == FinalizeRole: commit once MLflow has the windows =======================================


@dataclass
class MemoryWriter:
    """Stands in for RollupWriter; fails the first ``failures`` writes as MLflow down would."""

    failures: int = 0
    windows: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    # (agent, step) -> day/spans written with the window; (agent, hour step) -> hour/spans
    days: dict[tuple[str, int], float] = field(default_factory=dict)
    hours: dict[tuple[str, int], float] = field(default_factory=dict)
    alerts: list[Any] = field(default_factory=list)

    def write(
        self, finals: Sequence[Any], hours: Sequence[Any] = (), alerts: Sequence[Any] = ()
    ) -> list[str | None]:
        if self.failures:
            self.failures -= 1
            raise RetryableExportError("MLflow is down")
        self.windows.extend(
            (f.window_start_ms, f.aggregate.spans, f.source_partitions)
            for f in finals
            if f.series.agent != ALL_AGENTS
        )
        for f in finals:
            if f.day_metrics is not None:
                self.days[(f.series.agent, f.step)] = f.day_metrics["day/spans"]
        for hour in hours:
            self.hours[(hour.series.agent, hour.step)] = hour.metrics["hour/spans"]
        self.alerts.extend(alerts)
        return ["run" for _ in alerts]


W0, W1 = T0_MS, T0_MS + WINDOW_MS


def partial(source: int, window_start_ms: int = W0, spans: int = 3) -> bytes:
    return PartialRollup(
        SeriesKey("planner", ()), window_start_ms, WINDOW_MS, source, WindowAggregate(spans=spans)
    ).to_bytes()


def progress(source: int, closed_until_ms: int = W1) -> bytes:
    return PartitionProgress(source, closed_until_ms).to_bytes()


def finalize_role(writer: MemoryWriter, clock: Clock) -> FinalizeRole:
    return FinalizeRole(
        source_partitions=2,
        max_wait_ms=10 * WINDOW_MS,
        writer=writer,  # type: ignore[arg-type]
        clock=clock,
        retry_base_s=0.001,
        retry_max_s=0.001,
    )


@pytest.mark.parametrize(
    ("records", "windows", "commit", "until_ms"),
    [
        # A window waits for every source partition; its partial holds the commit.
        ([partial(0), progress(0)], [], 0, None),
        ([partial(0), progress(0), partial(1, spans=2), progress(1)], [(W0, 5, (0, 1))], 4, W1),
        ([progress(0), partial(0), partial(1), progress(1)], [(W0, 6, (0, 1))], 4, W1),
        # Source 1 had no span in the window: its progress alone completes it.
        ([partial(0), progress(0), progress(1)], [(W0, 3, (0,))], 3, W1),
        ([progress(0), progress(1)], [], 2, W1),
        # The next window is not closed anywhere yet: its partial holds the commit.
        ([progress(0), progress(1), partial(0, W1)], [], 2, W1),
        ([partial(0), progress(0), partial(0, W1), progress(1)], [(W0, 3, (0,))], 2, W1),
        ([b"not a partial", partial(0), progress(0), progress(1)], [(W0, 3, (0,))], 4, W1),
    ],
)
def test_finalize_commits_only_past_windows_mlflow_has(
    records: list[bytes],
    windows: list[tuple[int, int, tuple[int, ...]]],
    commit: int,
    until_ms: int | None,
) -> None:
    writer, clock = MemoryWriter(), Clock(W1 + 5_000)
    role = finalize_role(writer, clock)
    role.assign(0, None)
    for offset, value in enumerate(records):
        role.handle(0, offset, value)
    [(partition, got)] = run(role.tick).items()
    assert writer.windows == windows
    assert (partition, got.offset) == (0, commit)
    assert finalized_until(got.metadata) == until_ms


def test_finalize_waits_out_mlflow_failures_without_losing_a_window() -> None:
    writer, clock = MemoryWriter(failures=2), Clock(W1 + 5_000)
    role = finalize_role(writer, clock)
    role.assign(0, None)
    for offset, value in enumerate([partial(0), partial(1), progress(0), progress(1)]):
        role.handle(0, offset, value)
    commits = run(role.tick)
    assert writer.windows == [(W0, 6, (0, 1))]
    assert role.write_retries == 2
    assert commits == {0: Commit(4, f'{{"finalized_until_ms":{W1}}}')}


@pytest.mark.parametrize(
    ("resumed_with", "rewritten"),
    [
        (True, []),  # the commit says W0 is written: its replayed twin is ignored
        (False, [(W0, 3, (0,))]),  # without it, the twin alone is written again, incomplete
    ],
)
def test_finalize_reads_back_how_far_windows_are_final(
    resumed_with: bool, rewritten: list[tuple[int, int, tuple[int, ...]]]
) -> None:
    writer, clock = MemoryWriter(), Clock(W1 + 5_000)
    role = finalize_role(writer, clock)
    role.assign(0, None)
    for offset, value in enumerate([partial(0), partial(1), progress(0), progress(1)]):
        role.handle(0, offset, value)
    commit = run(role.tick)[0]
    assert finalized_until(commit.metadata) == W1
    # A new owner takes over at the commit; aggregate's replay re-sends source 0's partial.
    writer = MemoryWriter()
    role = finalize_role(writer, clock)
    role.assign(0, commit.offset, commit.metadata if resumed_with else "")
    assert role.mergers[0].finalized_until_ms == (W1 if resumed_with else None)
    role.handle(0, 4, partial(0))
    clock.now_ms += 11 * WINDOW_MS  # past max_wait: a waiting window is written incomplete
    assert run(role.tick)[0].offset == 5
    assert writer.windows == rewritten


@dataclass
class SummariesTopic:
    """The compacted summaries topic: the latest record per key, per partition."""

    records: dict[tuple[int, bytes], bytes | None] = field(default_factory=dict)

    async def send(self, key: bytes, value: bytes | None, partition: int) -> None:
        self.records[(partition, key)] = value

    def days(self, partition: int) -> list[SeriesDay]:
        return [
            SeriesDay.from_bytes(value)
            for (p, _), value in self.records.items()
            if p == partition and value is not None
        ]


H1 = 1_700_002_800_000  # a UTC hour boundary, after W0
BEFORE, AFTER = H1 - WINDOW_MS, H1


def test_finalize_saves_the_days_it_changed_and_a_new_owner_goes_on_from_them() -> None:
    topic, writer, clock = SummariesTopic(), MemoryWriter(), Clock(H1 + 5 * WINDOW_MS)

    def role_for(writer: MemoryWriter) -> FinalizeRole:
        return FinalizeRole(
            source_partitions=2,
            max_wait_ms=10 * WINDOW_MS,
            writer=writer,  # type: ignore[arg-type]
            clock=clock,
            send_summary=topic.send,
        )

    first_hour = [partial(0, BEFORE), partial(1, BEFORE, 2), progress(0, H1), progress(1, H1)]
    second_hour = [partial(0, AFTER, 4), progress(0, H1 + WINDOW_MS), progress(1, H1 + WINDOW_MS)]
    role = role_for(writer)
    role.assign(0, None)
    for offset, value in enumerate(first_hour):
        role.handle(0, offset, value)
    commit = run(role.tick)[0]
    # The window, its day so far, and its hour (every partition has closed it) are out; the
    # day is saved with the commit, its hour marked written.
    assert writer.days == {("planner", BEFORE // WINDOW_MS): 5}
    assert writer.hours == {("planner", BEFORE // 3_600_000): 5}
    [saved] = topic.days(0)
    assert saved.windows == {BEFORE // WINDOW_MS} and saved.hours_written == {H1 - 3_600_000}

    # A new owner resumes at the commit with the saved days; the partials after it come again.
    writer = MemoryWriter()
    role = role_for(writer)
    role.assign(0, commit.offset, commit.metadata, topic.days(0))
    for offset, value in enumerate(first_hour + second_hour):
        if offset >= commit.offset:
            role.handle(0, offset, value)
    run(role.tick)
    # The next window's day so far carries the first window's spans exactly once; nothing of
    # the first hour is written again.
    assert writer.days == {("planner", AFTER // WINDOW_MS): 9}
    assert writer.hours == {}  # the second hour is not over
    offset = len(first_hour + second_hour)
    role.handle(0, offset, progress(0, H1 + 3_600_000))
    role.handle(0, offset + 1, progress(1, H1 + 3_600_000))
    run(role.tick)
    assert writer.hours == {("planner", H1 // 3_600_000): 4}


def test_finalize_forgets_a_day_once_it_is_over() -> None:
    topic, writer = SummariesTopic(), MemoryWriter()
    day_end = 1_700_006_400_000  # a UTC midnight
    role = FinalizeRole(
        source_partitions=1,
        max_wait_ms=10 * WINDOW_MS,
        writer=writer,  # type: ignore[arg-type]
        clock=Clock(day_end + WINDOW_MS),
        send_summary=topic.send,
    )
    role.assign(0, None)
    role.handle(0, 0, partial(0, day_end - WINDOW_MS))
    role.handle(0, 1, progress(0, day_end))
    run(role.tick)
    # Deleted from the compacted topic: a new owner starts the next day afresh.
    assert topic.days(0) == []
    assert list(topic.records.values()) == [None]


@pytest.mark.parametrize(
    ("metadata", "until_ms"),
    [
        ("", None),
        (f'{{"finalized_until_ms":{W1}}}', W1),
        ("not json", None),
        ("[1]", None),
        ("null", None),
        ('{"finalized_until_ms":"5"}', None),
        ('{"v":1,"watermark_ms":5}', None),  # an aggregate checkpoint: not finalize's
    ],
)
def test_finalized_until_reads_only_finalize_marks(metadata: str, until_ms: int | None) -> None:
    assert finalized_until(metadata) == until_ms


# == kept_span_records / spans_of_record: the hand-off from aggregate to forward ============


def _origin(resource: dict[str, Any], scope: str, schema: str = "") -> SpanOrigin:
    return SpanOrigin(
        resource=Resource(attributes=attributes(resource)),
        scope=InstrumentationScope(name=scope, version="1.2"),
        resource_schema_url=schema,
        scope_schema_url=schema,
        service_name=resource.get("service.name"),
        project=resource.get("openinference.project.name"),
    )


ORIGIN_A = _origin(
    {"service.name": "shop", "openinference.project.name": "shop-agents"},
    "langchain",
    "https://opentelemetry.io/schemas/1.26.0",
)
ORIGIN_B = _origin({"service.name": "search"}, "openai")
_WIRE_ORIGINS = {id(origin): wire_origin(origin) for origin in (ORIGIN_A, ORIGIN_B)}


def kept_span(trace_id: bytes, origin: SpanOrigin, pb: Span) -> KeptSpan:
    """A kept span as aggregate hands it over: spans of one origin share its wire origin."""
    return KeptSpan(trace_id, _WIRE_ORIGINS[id(origin)], pb.SerializeToString())


def test_kept_spans_round_trip_with_their_origin_and_project() -> None:
    sent = [
        (tid(1), ORIGIN_A, span_pb(trace=1, span=1, attrs={"llm.model_name": "m"})),
        (tid(2), ORIGIN_B, span_pb(trace=2, span=1)),
        (tid(1), ORIGIN_B, span_pb(trace=1, span=2, parent=1)),
        (tid(1), ORIGIN_A, span_pb(trace=1, span=3, parent=1)),
    ]
    records = kept_span_records([kept_span(*item) for item in sent])
    assert [key for key, _ in records] == [tid(1), tid(2)], "one record per trace"
    for key, value in records:
        items = spans_of_record(value)
        expected = [(origin, pb) for trace_id, origin, pb in sent if trace_id == key]
        assert sorted(span.span_id for _, span in items) == sorted(pb.span_id for _, pb in expected)
        by_id = {pb.span_id: (origin, pb) for origin, pb in expected}
        for origin, span in items:
            sent_origin, sent_pb = by_id[span.span_id]
            assert span == sent_pb
            assert origin.resource == sent_origin.resource
            assert origin.scope == sent_origin.scope
            assert origin.resource_schema_url == sent_origin.resource_schema_url
            assert origin.scope_schema_url == sent_origin.scope_schema_url
            assert origin.project == sent_origin.project
    [(_, first)] = [r for r in records if r[0] == tid(1)]
    assert {o.project for o, _ in spans_of_record(first)} == {"shop-agents", None}


@settings(max_examples=150, deadline=None)
@given(
    traces=st.lists(
        st.lists(st.tuples(st.integers(0, 2_000), st.booleans()), min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ),
    max_record_bytes=st.integers(200, 6_000),
)
def test_records_are_split_under_the_size_limit_and_lose_no_span(
    traces: list[list[tuple[int, bool]]], max_record_bytes: int
) -> None:
    spans: list[KeptSpan] = []
    want: dict[bytes, list[bytes]] = {}
    for trace, sizes in enumerate(traces, start=1):
        for number, (padding, other_origin) in enumerate(sizes, start=1):
            pb = span_pb(trace=trace, span=number, attrs={"input.value": "x" * padding})
            spans.append(kept_span(tid(trace), ORIGIN_B if other_origin else ORIGIN_A, pb))
            want.setdefault(tid(trace), []).append(pb.span_id)
    records = kept_span_records(spans, max_record_bytes=max_record_bytes)
    got: dict[bytes, list[bytes]] = {}
    for key, value in records:
        items = spans_of_record(value)
        assert items, "an empty record"
        assert len(value) <= max_record_bytes or len(items) == 1, (len(value), len(items))
        assert {span.trace_id for _, span in items} == {key}
        got.setdefault(key, []).extend(span.span_id for _, span in items)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def test_a_trace_too_big_for_one_record_is_split() -> None:
    spans = [
        kept_span(tid(1), ORIGIN_A, span_pb(trace=1, span=n, attrs={"input.value": "x" * 500}))
        for n in range(1, 11)
    ]
    records = kept_span_records(spans, max_record_bytes=2_000)
    assert len(records) >= 3
    assert all(len(value) <= 2_000 for _, value in records)
    assert [span.span_id for _, v in records for _, span in spans_of_record(v)] == [
        sid(n) for n in range(1, 11)
    ]


def test_an_empty_record_has_no_spans() -> None:
    assert spans_of_record(b"") == []


@pytest.mark.parametrize(
    "value",
    [b"\x0a\xff", b"\xff\xff\xff", b"\x0a\x05\x0a\x03", b'{"resourceSpans": []}'],
    ids=["bad-length", "bad-tag", "truncated", "json"],
)
def test_bytes_that_are_not_an_export_request_raise_invalid_protobuf(value: bytes) -> None:
    with pytest.raises(InvalidInput) as raised:
        spans_of_record(value)
    assert raised.value.reason == "invalid_protobuf"
