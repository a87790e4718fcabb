"""SpanForwarder's bookkeeping: batching, projects, backpressure, offsets, retries, dead letters.

The network is an ``httpx.MockTransport`` answering from a script: these tests pin our policy
(what is sent when, what is retried, when an offset may be committed), not Phoenix's behaviour,
which tests/integration/test_phoenix_forwarding.py checks against the real server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from pydantic import SecretStr

from processor.core.decoding import extract_spans
from processor.core.semconv import ExtractionConfig
from processor.errors import ConfigurationError
from processor.sinks.phoenix import ExportResult, PhoenixExporter, RetryPolicy
from processor.worker.phoenix_delivery import ForwardedBatch, SpanForwarder, SpanItem

URL = "http://phoenix.test/v1/traces"
KEY = "sk-very-secret-0123456789"
FAST_RETRY = RetryPolicy(initial_s=0.001, max_s=0.005)
T0_NS = 1_700_000_000_000_000_000

Answer = int | type[httpx.TransportError]
_next_span_id = iter(range(1, 1 << 40))


def _spans(count: int, *, project: str | None = None) -> list[SpanItem]:
    """One sampled-topic record's worth of kept spans, with fresh span ids, as the forward
    role hands them over (each with its origin)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="svc"))
    )
    if project is not None:
        resource_spans.resource.attributes.append(
            KeyValue(key="openinference.project.name", value=AnyValue(string_value=project))
        )
    scope_spans = resource_spans.scope_spans.add()
    for _ in range(count):
        span = scope_spans.spans.add()
        span.trace_id = b"\x07" * 16
        span.span_id = next(_next_span_id).to_bytes(8, "big")
        span.name = "step"
        span.start_time_unix_nano = T0_NS
        span.end_time_unix_nano = T0_NS + 1_000
    decoded = extract_spans(request, ExtractionConfig())
    assert len(decoded.spans) == count
    return [(record.origin, record.pb) for record in decoded.spans]


def _ids(spans: Sequence[SpanItem]) -> list[bytes]:
    return [span.span_id for _, span in spans]


class ScriptedPhoenix:
    """Answers each export with the next scripted status (or raises the scripted transport
    error), then 200; ``gate`` holds every export until it is set. ``lose`` exports are
    answered 200 and then forgotten, as a Phoenix that stops with them in its queue does.
    GraphQL ``getSpanByOtelId`` queries answer from what was stored, after the next scripted
    ``query_script`` answer (a status or transport error) if any."""

    def __init__(
        self,
        script: Sequence[Answer] = (),
        *,
        gate: asyncio.Event | None = None,
        lose: int = 0,
        query_script: Sequence[Answer] = (),
        write_s: float = 0.0,
        never_write: frozenset[bytes] = frozenset(),
    ):
        self.script = list(script)
        self.gate = gate
        self.lose = lose
        self.write_s = write_s  # each accepted batch takes this long to write, one at a time
        self._writer_free_at = 0.0
        self.written_at: dict[bytes, float] = {}
        self.never_write = never_write  # accepted, then failed by Phoenix's writer every time
        self.query_script = list(query_script)
        self.requests: list[httpx.Request] = []
        self.queries: list[httpx.Request] = []
        self.stored: Counter[bytes] = Counter()
        self.projects: dict[bytes, str | None] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/graphql":
            return self._query(request)
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.script.pop(0) if self.script else 200
        if not isinstance(answer, int):
            raise answer("scripted failure", request=request)
        if answer == 200 and self.lose:
            self.lose -= 1
        elif answer == 200:
            now = asyncio.get_running_loop().time()
            self._writer_free_at = max(self._writer_free_at, now) + self.write_s
            body = ExportTraceServiceRequest.FromString(gzip.decompress(request.content))
            for rs in body.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        if span.span_id in self.never_write:
                            continue
                        self.stored[span.span_id] += 1
                        self.projects[span.span_id] = request.headers.get("x-project-name")
                        self.written_at.setdefault(span.span_id, self._writer_free_at)
        return httpx.Response(answer, text="" if answer == 200 else f"answer {answer}")

    def _query(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(request)
        answer = self.query_script.pop(0) if self.query_script else 200
        if not isinstance(answer, int):
            raise answer("scripted failure", request=request)
        if answer != 200:
            return httpx.Response(answer)
        variables = json.loads(request.content)["variables"]
        now = asyncio.get_running_loop().time()
        stored = {span_id.hex() for span_id, at in self.written_at.items() if at <= now}
        return httpx.Response(
            200,
            json={
                "data": {
                    name: ({"id": "U3Bhbjox"} if span_id in stored else None)
                    for name, span_id in variables.items()
                }
            },
        )

    def batch_sizes(self) -> list[int]:
        sizes = []
        for request in self.requests:
            body = ExportTraceServiceRequest.FromString(gzip.decompress(request.content))
            sizes.append(sum(len(ss.spans) for rs in body.resource_spans for ss in rs.scope_spans))
        return sizes


class DeadLetters:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[tuple[ForwardedBatch, ExportResult]] = []
        self._failures = failures

    async def __call__(self, batch: ForwardedBatch, result: ExportResult) -> None:
        if self._failures:
            self._failures -= 1
            raise RuntimeError("kafka is down")
        self.batches.append((batch, result))


def _forwarder(
    phoenix: ScriptedPhoenix,
    *,
    dead_letters: DeadLetters | None = None,
    api_key: str | None = None,
    **kwargs: object,
) -> SpanForwarder:
    exporter = PhoenixExporter(
        traces_url=URL,
        api_key=SecretStr(api_key) if api_key else None,
        transport=httpx.MockTransport(phoenix),
    )
    options: dict[str, object] = {
        "default_project": "fallback",
        "batch_spans": 10,
        "batch_interval_s": 60.0,
        "max_in_flight": 2,
        "retry": FAST_RETRY,
        "confirm_interval_s": 0.01,
    }
    options.update(kwargs)
    return SpanForwarder(exporter, on_failure=dead_letters or DeadLetters(), **options)  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def test_full_batches_are_sent_by_size_and_every_span_arrives_once() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix()
        forwarder = _forwarder(phoenix, batch_spans=10)
        messages = [_spans(n) for n in (3, 7, 12, 1, 25, 3)]
        for offset, spans in enumerate(messages):
            await forwarder.add(spans, partition=0, offset=offset)
        await _until(lambda: forwarder.in_flight == 0, "the full batches")
        assert phoenix.batch_sizes() == [10] * 5, "full batches go before any timer"
        assert forwarder.pending_offset(0) == 5, "offset 5 still has a span in the buffer"
        await forwarder.drain(5)
        assert phoenix.batch_sizes() == [10] * 5 + [1]
        want = [span_id for spans in messages for span_id in _ids(spans)]
        assert sorted(phoenix.stored) == sorted(want)
        assert set(phoenix.stored.values()) == {1}
        assert forwarder.pending_offset(0) is None

    run(scenario)


def test_a_partial_batch_is_sent_after_the_interval() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix()
        forwarder = _forwarder(phoenix, batch_spans=1000, batch_interval_s=0.2)
        await forwarder.start()
        assert len(phoenix.requests) == 1, "start() checks access with one empty request"
        await forwarder.add(_spans(3), partition=0, offset=0)
        await asyncio.sleep(0.05)
        assert len(phoenix.requests) == 1, "sent before the interval"
        await _until(lambda: forwarder.pending_offset(0) is None, "the timed batch", 2.0)
        assert phoenix.batch_sizes()[1:] == [3]
        await forwarder.drain(1)

    run(scenario)


def test_each_project_gets_its_own_batches_and_header() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix()
        forwarder = _forwarder(phoenix, batch_spans=4)
        a, b, default = _spans(5, project="shop"), _spans(3, project="search"), _spans(2)
        mixed = [a[0], b[0], default[0], *a[1:], *b[1:], *default[1:]]  # one message, 3 projects
        await forwarder.add(mixed, partition=0, offset=0)
        await forwarder.drain(5)
        assert {phoenix.projects[i] for i in _ids(a)} == {"shop"}
        assert {phoenix.projects[i] for i in _ids(b)} == {"search"}
        assert {phoenix.projects[i] for i in _ids(default)} == {"fallback"}
        for request in phoenix.requests:
            body = ExportTraceServiceRequest.FromString(gzip.decompress(request.content))
            assert len(body.resource_spans) == 1, "a batch never mixes projects here"

    run(scenario)


def test_offsets_wait_for_the_batch_that_holds_their_spans() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        phoenix = ScriptedPhoenix(gate=gate)
        forwarder = _forwarder(phoenix, batch_spans=4, max_in_flight=4)
        await forwarder.add(_spans(2), partition=0, offset=10)
        await forwarder.add(_spans(3), partition=0, offset=11)  # split over two batches
        await forwarder.add(_spans(1), partition=1, offset=5)
        await forwarder.add(_spans(2), partition=0, offset=12)  # fills the second batch
        await _until(lambda: len(phoenix.requests) == 2, "two requests out")
        assert forwarder.pending_offset(0) == 10
        assert forwarder.pending_offset(1) == 5
        assert forwarder.pending_offset(2) is None, "a partition never seen has nothing pending"
        gate.set()
        await _until(lambda: forwarder.in_flight == 0, "both answered")
        assert forwarder.pending_offset(0) is None
        assert forwarder.pending_offset(1) is None
        await forwarder.drain(1)

    run(scenario)


def test_too_many_requests_in_flight_make_add_wait() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        phoenix = ScriptedPhoenix(gate=gate)
        forwarder = _forwarder(phoenix, batch_spans=5, max_in_flight=2)
        await forwarder.add(_spans(5), partition=0, offset=0)
        await forwarder.add(_spans(5), partition=0, offset=1)
        blocked = asyncio.create_task(forwarder.add(_spans(5), partition=0, offset=2))
        await asyncio.sleep(0.05)
        assert not blocked.done(), "a third batch went out past the in-flight bound"
        assert len(phoenix.requests) == 2
        gate.set()
        await asyncio.wait_for(blocked, timeout=2)
        await forwarder.drain(2)
        assert len(phoenix.stored) == 15

    run(scenario)


def test_flush_never_waits_for_phoenix() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        phoenix = ScriptedPhoenix(gate=gate)
        forwarder = _forwarder(phoenix, batch_spans=2, max_in_flight=1)
        await forwarder.add(_spans(2), partition=0, offset=0)  # takes the only slot
        await forwarder.add(_spans(1), partition=0, offset=1)
        await _until(lambda: len(phoenix.requests) == 1, "the first request")
        await asyncio.wait_for(forwarder.flush(), timeout=0.5)
        await asyncio.sleep(0.05)
        assert len(phoenix.requests) == 1
        gate.set()
        await _until(lambda: forwarder.in_flight == 0, "the first batch")
        await forwarder.flush()
        await _until(lambda: forwarder.pending_offset(0) is None, "the flushed batch")
        assert phoenix.batch_sizes() == [2, 1]
        await forwarder.drain(1)

    run(scenario)


def test_an_add_waiting_when_drain_gives_up_sends_nothing_later() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([503] * 10_000)
        forwarder = _forwarder(phoenix, batch_spans=1, max_in_flight=1)
        await forwarder.add(_spans(1), partition=0, offset=0)
        waiting = asyncio.create_task(forwarder.add(_spans(1), partition=0, offset=1))
        await asyncio.sleep(0.01)
        assert await forwarder.drain(0.1) == 2
        assert forwarder.in_flight == 0  # no request outlives the drain (its client is closed)
        await asyncio.wait_for(waiting, timeout=1)
        requests = len(phoenix.requests)
        await asyncio.sleep(0.05)
        assert len(phoenix.requests) == requests
        assert forwarder.pending_offset(0) == 0

    run(scenario)


@pytest.mark.parametrize(
    "failures",
    [
        [503, 503],  # Phoenix's span queue is full
        [429, 500, 502, 504],
        [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError],
        [408, 507],
    ],
)
def test_environmental_failures_are_retried_until_accepted(failures: list[Answer]) -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(failures)
        dead_letters = DeadLetters()
        forwarder = _forwarder(phoenix, dead_letters=dead_letters, max_in_flight=1)
        spans = _spans(4)
        await forwarder.add(spans, partition=3, offset=40)
        await forwarder.flush()
        assert forwarder.pending_offset(3) == 40
        await _until(lambda: forwarder.pending_offset(3) is None, "acceptance after retries")
        assert len(phoenix.requests) == len(failures) + 1
        assert sorted(phoenix.stored) == sorted(_ids(spans))
        assert forwarder.stats.retried_attempts == len(failures)
        assert not dead_letters.batches
        await forwarder.drain(1)

    run(scenario)


def test_retry_after_is_honoured() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix()

        async def slow_down_once(request: httpx.Request) -> httpx.Response:
            if not phoenix.requests:
                phoenix.requests.append(request)
                return httpx.Response(429, headers={"retry-after": "1"})
            return await phoenix(request)

        exporter = PhoenixExporter(traces_url=URL, transport=httpx.MockTransport(slow_down_once))
        forwarder = SpanForwarder(
            exporter, default_project="p", on_failure=DeadLetters(), retry=FAST_RETRY
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await forwarder.add(_spans(1), partition=0, offset=0)
        await forwarder.flush()
        await _until(lambda: forwarder.pending_offset(0) is None, "the retried batch")
        assert loop.time() - started >= 1.0
        await forwarder.drain(1)

    run(scenario)


def test_offsets_wait_until_phoenix_has_written_the_batch() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(lose=1)  # 200, then nothing written: Phoenix stopped
        forwarder = _forwarder(phoenix, confirm_timeout_s=0.3)
        spans = _spans(3)
        await forwarder.add(spans, partition=0, offset=0)
        await forwarder.flush()
        await _until(lambda: len(phoenix.queries) >= 3, "questions about the batch")
        assert forwarder.pending_offset(0) == 0, "a 2xx alone advanced the offset"
        await _until(lambda: forwarder.pending_offset(0) is None, "the batch sent again")
        assert len(phoenix.requests) == 2
        assert sorted(phoenix.stored) == sorted(_ids(spans))
        assert forwarder.stats.resent_batches == 1
        await forwarder.drain(1)

    run(scenario)


def test_a_batch_overtaken_by_a_later_one_is_sent_again() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(lose=1)
        forwarder = _forwarder(phoenix, batch_spans=2, overtake_grace_s=0.0)
        first, second = _spans(2), _spans(2)
        await forwarder.add(first, partition=0, offset=0)
        await asyncio.sleep(0.02)
        await forwarder.add(second, partition=0, offset=1)
        await _until(lambda: forwarder.pending_offset(0) is None, "both written")
        assert sorted(phoenix.stored) == sorted(_ids(first) + _ids(second))
        assert forwarder.stats.resent_batches == 1
        await forwarder.drain(1)

    run(scenario)


def test_a_slow_phoenix_that_keeps_writing_gets_no_resends() -> None:
    async def scenario() -> None:
        # Six batches, 0.15 s each to write: the last waits 0.9 s, well past the timeout,
        # but Phoenix writes one of ours every 0.15 s, so nothing is stalled.
        phoenix = ScriptedPhoenix(write_s=0.15)
        forwarder = _forwarder(phoenix, batch_spans=2, max_in_flight=6, confirm_timeout_s=0.4)
        for offset in range(6):
            await forwarder.add(_spans(2), partition=0, offset=offset)
        await _until(lambda: forwarder.pending_offset(0) is None, "every batch written")
        assert len(phoenix.requests) == 6
        assert forwarder.stats.resent_batches == 0
        await forwarder.drain(1)

    run(scenario)


def test_a_batch_lost_in_a_phoenix_restart_is_resent_before_the_timeout() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(lose=1, query_script=[httpx.ConnectError, 200])
        forwarder = _forwarder(phoenix, confirm_timeout_s=60)
        spans = _spans(2)
        await forwarder.add(spans, partition=0, offset=0)
        await forwarder.flush()
        await _until(lambda: forwarder.pending_offset(0) is None, "the resent batch", 5)
        assert len(phoenix.requests) == 2
        assert sorted(phoenix.stored) == sorted(_ids(spans))
        await forwarder.drain(1)

    run(scenario)


def test_a_batch_phoenix_never_writes_while_writing_others_is_dead_lettered() -> None:
    async def scenario() -> None:
        poison = _spans(2)
        phoenix = ScriptedPhoenix(never_write=frozenset({poison[-1][1].span_id}))
        dead_letters = DeadLetters()
        forwarder = _forwarder(
            phoenix,
            dead_letters=dead_letters,
            batch_spans=2,
            max_in_flight=4,
            overtake_grace_s=0.0,
            max_unconfirmed_resends=2,
        )
        await forwarder.add(poison, partition=0, offset=0)
        offset = 1
        while not dead_letters.batches:  # later batches keep being written, overtaking it
            await forwarder.add(_spans(2), partition=1, offset=offset)
            offset += 1
            await asyncio.sleep(0.02)
        ((batch, result),) = dead_letters.batches
        assert batch.sources == ((0, 0),)
        assert "never wrote its span" in result.detail
        assert forwarder.stats.resent_batches == 2
        await _until(lambda: forwarder.pending_offset(0) is None, "the poison batch settled")
        await forwarder.drain(1)

    run(scenario)


def test_a_phoenix_that_cannot_say_what_it_wrote_is_trusted_with_one_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(query_script=[404])
        forwarder = _forwarder(phoenix, batch_spans=1)
        for offset in range(3):
            await forwarder.add(_spans(1), partition=0, offset=offset)
        await _until(lambda: forwarder.pending_offset(0) is None, "trust in 2xx")
        assert len(phoenix.queries) == 1
        await forwarder.drain(1)

    with caplog.at_level(logging.ERROR):
        run(scenario)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "cannot tell which spans it has written" in error


def test_without_confirmation_a_2xx_settles_at_once() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix(lose=1)
        forwarder = _forwarder(phoenix, confirm_stored=False)
        await forwarder.add(_spans(1), partition=0, offset=0)
        await forwarder.flush()
        await _until(lambda: forwarder.pending_offset(0) is None, "the 2xx")
        assert not phoenix.queries
        await forwarder.drain(1)

    run(scenario)


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_a_permanent_rejection_is_dead_lettered_then_the_offsets_advance(status: int) -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([status])
        dead_letters = DeadLetters()
        forwarder = _forwarder(phoenix, dead_letters=dead_letters, batch_spans=5)
        first, second = _spans(3), _spans(2)
        await forwarder.add(first, partition=2, offset=7)
        await forwarder.add(second, partition=2, offset=8)
        await _until(lambda: forwarder.pending_offset(2) is None, "the dead letter")
        (batch, result), *rest = dead_letters.batches
        assert not rest
        assert len(phoenix.requests) == 1, "a permanent failure was retried"
        assert result.status == status
        assert result.detail == f"answer {status}"
        assert batch.sources == ((2, 7), (2, 8))
        assert batch.project == "fallback"
        assert [pb.span_id for _, pb in batch.items] == _ids(first) + _ids(second)
        request = ExportTraceServiceRequest.FromString(batch.to_request_bytes())
        assert sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans) == 5
        assert forwarder.stats.dead_lettered_spans == 5
        await forwarder.drain(1)

    run(scenario)


def test_offsets_wait_until_the_dead_letter_is_written() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([422])
        dead_letters = DeadLetters(failures=3)
        forwarder = _forwarder(phoenix, dead_letters=dead_letters)
        await forwarder.add(_spans(2), partition=0, offset=1)
        await forwarder.flush()
        await _until(lambda: forwarder.pending_offset(0) is None, "the dead letter")
        assert len(dead_letters.batches) == 1
        await forwarder.drain(1)

    run(scenario)


def test_a_rejected_key_is_one_clear_error_and_nothing_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([401] * 6)
        dead_letters = DeadLetters()
        forwarder = _forwarder(phoenix, dead_letters=dead_letters, api_key=KEY, batch_spans=2)
        first, second = _spans(2), _spans(2)
        await forwarder.add(first, partition=0, offset=0)
        await forwarder.add(second, partition=0, offset=1)
        await _until(lambda: len(phoenix.requests) >= 4, "retries of the refused batches")
        assert forwarder.pending_offset(0) == 0, "an offset advanced past refused spans"
        assert forwarder.stats.unauthorized
        # The key gets fixed (here: the script runs out of 401s): everything arrives.
        await _until(lambda: forwarder.pending_offset(0) is None, "delivery after the fix")
        assert sorted(phoenix.stored) == sorted(_ids(first) + _ids(second))
        assert not dead_letters.batches
        assert not forwarder.stats.unauthorized
        await forwarder.drain(1)

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "PHOENIX_API_KEY" in errors[0].getMessage()
    assert "401" in errors[0].getMessage()
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_start_refuses_a_rejected_key_with_a_clear_error() -> None:
    async def scenario() -> None:
        forwarder = _forwarder(ScriptedPhoenix([401]), api_key=KEY)
        with pytest.raises(ConfigurationError, match="PHOENIX_API_KEY") as raised:
            await forwarder.start()
        assert KEY not in str(raised.value)
        await forwarder.drain(1)

    run(scenario)


def test_start_with_phoenix_down_goes_on() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([httpx.ConnectError])
        forwarder = _forwarder(phoenix)
        await forwarder.start()
        await forwarder.add(_spans(1), partition=0, offset=0)
        await forwarder.drain(2)
        assert len(phoenix.stored) == 1

    run(scenario)


def test_forget_drops_a_revoked_partitions_unsent_spans_and_bookkeeping() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix()
        forwarder = _forwarder(phoenix, batch_spans=100)
        kept, revoked = _spans(3), _spans(4)
        await forwarder.add(kept, partition=0, offset=0)
        await forwarder.add(revoked, partition=1, offset=0)
        forwarder.forget([1])
        assert forwarder.pending_offset(1) is None
        assert forwarder.pending_offset(0) == 0
        await forwarder.drain(2)
        assert sorted(phoenix.stored) == sorted(_ids(kept))
        assert forwarder.stats.dropped_on_revoke_spans == 4

    run(scenario)


def test_a_batch_out_before_a_revocation_does_not_settle_the_replay() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        phoenix = ScriptedPhoenix(gate=gate)
        forwarder = _forwarder(phoenix, batch_spans=2, max_in_flight=4)
        await forwarder.add(_spans(2), partition=0, offset=5)  # out, held by the gate
        forwarder.forget([0])
        # Reassigned and replayed from offset 5: this time the message is still buffered.
        await forwarder.add(_spans(1), partition=0, offset=5)
        gate.set()
        await _until(lambda: forwarder.in_flight == 0, "the old batch")
        assert forwarder.pending_offset(0) == 5, "the old batch settled the replayed message"
        await forwarder.drain(2)
        assert forwarder.pending_offset(0) is None

    run(scenario)


def test_a_replay_of_lower_offsets_keeps_the_smallest_pending() -> None:
    async def scenario() -> None:
        forwarder = _forwarder(ScriptedPhoenix(), batch_spans=100)
        for offset in (20, 21, 3, 4):
            await forwarder.add(_spans(1), partition=0, offset=offset)
        assert forwarder.pending_offset(0) == 3
        await forwarder.drain(2)

    run(scenario)


def test_drain_sends_what_is_buffered_and_gives_up_on_a_dead_phoenix_in_time() -> None:
    async def scenario() -> None:
        phoenix = ScriptedPhoenix([503] * 10_000)
        forwarder = _forwarder(phoenix, batch_spans=100)
        await forwarder.add(_spans(3), partition=0, offset=0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        undelivered = await forwarder.drain(0.3)
        assert 0.3 <= loop.time() - started < 2.0
        assert undelivered == 3
        assert forwarder.pending_offset(0) == 0, "undelivered spans must keep their offset"
        assert len(phoenix.requests) > 1, "the buffered batch was not even tried"

    run(scenario)


def test_spans_added_while_draining_hold_their_offset() -> None:
    async def scenario() -> None:
        forwarder = _forwarder(ScriptedPhoenix())
        await forwarder.drain(1)
        await forwarder.add(_spans(1), partition=0, offset=9)
        assert forwarder.pending_offset(0) == 9

    run(scenario)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_project": ""},
        {"default_project": "caf\u00e9"},
        {"batch_spans": 0},
        {"batch_interval_s": 0},
        {"max_in_flight": 0},
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, Any]) -> None:
    async def scenario() -> None:
        exporter = PhoenixExporter(traces_url=URL)
        options: dict[str, Any] = {"default_project": "p", **kwargs}
        with pytest.raises(ValueError):
            SpanForwarder(exporter, on_failure=DeadLetters(), **options)
        await exporter.shutdown()

    run(scenario)
