"""SpanForwarder + PhoenixExporter against real Phoenix servers: nothing lost, nothing twice.

Two Phoenix processes, started in parallel once for this module (Phoenix takes a minute or
more to start on a busy machine, so the tests share them; each test has its own projects and
its own traces, so they do not see each other's spans):

- ``open``: auth off, default queue. Projects, replays, and a 30 s outage mid-stream.
- ``locked``: auth on (PHOENIX_ENABLE_AUTH, PHOENIX_SECRET) with a real system API key, and a
  span queue so small (PHOENIX_MAX_SPANS_QUEUE_SIZE) that Phoenix answers 503 under load.

Everything is read back through Phoenix's REST API: Phoenix queues what it accepts and writes
it a moment later, so reads poll.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from pydantic import SecretStr

from processor.core.decoding import extract_spans
from processor.core.semconv import PROJECT_NAME, ExtractionConfig
from processor.errors import ConfigurationError
from processor.loadgen import Scenario, TraceGenerator
from processor.settings import StackSettings
from processor.sinks.phoenix import ExportResult, PhoenixExporter, RetryPolicy
from processor.stack import LocalStack
from processor.worker.phoenix_delivery import ForwardedBatch, SpanForwarder, SpanItem
from tests.integration.support import poll_until

pytestmark = pytest.mark.integration

# Phoenix's rules: at least 32 characters with digits and lower-case letters; the admin secret
# must differ from the signing secret.
SECRET = "forwarding-test-secret-0123456789abcdef"
ADMIN_SECRET = "forwarding-test-admin-9876543210fedcba"
SMALL_QUEUE = 5  # spans: while Phoenix still queues one batch, the next request gets 503
OUTAGE_S = 30.0
_seeds = itertools.count(int(time.time()) % 100_000 * 100)  # fresh trace ids on every run


@dataclass
class Phoenix:
    stack: LocalStack
    url: str
    api_key: str | None  # a key Phoenix accepts; None when auth is off

    def stored(self, project: str) -> list[dict]:
        """Every span Phoenix holds for ``project`` (REST API, all pages)."""
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        spans: list[dict] = []
        cursor: str | None = None
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            while True:
                params: dict[str, str | int] = {"limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                response = client.get(f"/v1/projects/{project}/spans", params=params)
                if response.status_code == 404:
                    return []  # no span of the project has arrived yet
                response.raise_for_status()
                body = response.json()
                spans.extend(body["data"])
                cursor = body.get("next_cursor")
                if not cursor:
                    return spans

    def stored_ids(self, project: str) -> list[str]:
        return [span["context"]["span_id"] for span in self.stored(project)]

    def wait_for(self, project: str, want: set[str], timeout_s: float = 60) -> list[str]:
        """The stored span ids once every wanted one is there."""
        return poll_until(
            lambda: ids if want <= set(ids := self.stored_ids(project)) else None,
            timeout_s=timeout_s,
            interval_s=0.5,
            what=f"{len(want)} spans in Phoenix project {project}",
        )


def _stack(state: Path, http_port: int, port_base: int, env: dict[str, str]) -> LocalStack:
    # Only Phoenix is started; the other ports are set so that nothing defaults to 9092/5000.
    settings = StackSettings(
        dir=state,
        phoenix_port=http_port,
        phoenix_grpc_port=port_base + 317,
        kafka_port=port_base + 92,
        kafka_controller_port=port_base + 93,
        mlflow_port=port_base + 500,
        start_timeout_s=600,
    )
    return LocalStack(settings, phoenix_env=env)


@pytest.fixture(scope="module")
def phoenixes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Phoenix]]:
    base = int(os.environ.get("TEST_PHOENIX_FORWARDING_PORT_BASE", "43000"))
    # The Phoenix that a test stops and starts again listens below Linux's ephemeral port range
    # (32768-60999). While nothing listens on a port in that range, a client retrying to
    # connect to it can be given that very port as its own source port and connect to itself;
    # that socket then holds the port and the restarted Phoenix cannot bind it.
    restarted_port = int(os.environ.get("TEST_PHOENIX_FORWARDING_RESTART_PORT", "29006"))
    stacks = {
        "open": _stack(tmp_path_factory.mktemp("phoenix-open"), restarted_port, base, {}),
        "locked": _stack(
            tmp_path_factory.mktemp("phoenix-locked"),
            base + 106,
            base + 100,
            {
                "PHOENIX_ENABLE_AUTH": "true",
                "PHOENIX_SECRET": SECRET,
                "PHOENIX_ADMIN_SECRET": ADMIN_SECRET,
                "PHOENIX_MAX_SPANS_QUEUE_SIZE": str(SMALL_QUEUE),
            },
        ),
    }
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            urls = dict(
                zip(
                    stacks,
                    pool.map(lambda s: s.up(services=("phoenix",)).phoenix_url, stacks.values()),
                    strict=True,
                )
            )
        yield {
            "open": Phoenix(stacks["open"], urls["open"], None),
            "locked": Phoenix(stacks["locked"], urls["locked"], _system_api_key(urls["locked"])),
        }
    finally:
        for stack in stacks.values():
            stack.down(services=("phoenix",))


def _system_api_key(url: str) -> str:
    """A real system API key, minted with the admin secret as Phoenix's docs describe."""
    response = httpx.post(
        f"{url}/v1/system/api_keys",
        json={"data": {"name": "span-forwarder"}},
        headers={"authorization": f"Bearer {ADMIN_SECRET}"},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["data"]["key"])


def _messages(count: int, *, project: str | None = None) -> list[list[SpanItem]]:
    """``count`` Kafka messages of one loadgen trace each, decoded as aggregate decodes them."""
    generator = TraceGenerator(
        Scenario(agents=5, trace_size=20, seed=next(_seeds)),
        start_ms=time.time_ns() // 1_000_000 - 600_000,
    )
    messages = []
    for trace in generator.generate(count):
        request = ExportTraceServiceRequest()
        request.CopyFrom(trace.request)
        if project is not None:
            request.resource_spans[0].resource.attributes.append(
                KeyValue(key=PROJECT_NAME, value=AnyValue(string_value=project))
            )
        records = extract_spans(request, ExtractionConfig()).spans
        messages.append([(record.origin, record.pb) for record in records])
    return messages


def _ids(messages: Sequence[Sequence[SpanItem]]) -> set[str]:
    return {span.span_id.hex() for spans in messages for _, span in spans}


class DeadLetters:
    def __init__(self) -> None:
        self.batches: list[tuple[ForwardedBatch, ExportResult]] = []

    async def __call__(self, batch: ForwardedBatch, result: ExportResult) -> None:
        self.batches.append((batch, result))


def _forwarder(
    phoenix: Phoenix,
    *,
    project: str,
    api_key: str | None = None,
    dead_letters: DeadLetters | None = None,
    **options: float,
) -> SpanForwarder:
    exporter = PhoenixExporter(
        traces_url=f"{phoenix.url}/v1/traces",
        api_key=SecretStr(api_key) if api_key else None,
        timeout_s=10,
    )
    return SpanForwarder(
        exporter,
        default_project=project,
        on_failure=dead_letters if dead_letters is not None else DeadLetters(),
        batch_spans=int(options.get("batch_spans", 200)),
        batch_interval_s=options.get("batch_interval_s", 0.2),
        max_in_flight=int(options.get("max_in_flight", 4)),
        retry=RetryPolicy(initial_s=0.1, max_s=options.get("retry_max_s", 2.0)),
    )


async def _feed(
    forwarder: SpanForwarder, messages: Sequence[Sequence[SpanItem]], partitions: int = 2
) -> None:
    """What the forward role does: each message, in offset order per partition."""
    for index, spans in enumerate(messages):
        await forwarder.add(spans, partition=index % partitions, offset=index // partitions)


def test_auth_off_every_span_arrives_once_in_its_project(
    phoenixes: dict[str, Phoenix], unique_name: str
) -> None:
    phoenix = phoenixes["open"]
    named = f"{unique_name}-named"
    from_resource = _messages(12, project=named)
    defaulted = _messages(12)
    mixed = [m for pair in zip(from_resource, defaulted, strict=True) for m in pair]

    async def scenario() -> SpanForwarder:
        forwarder = _forwarder(phoenix, project=unique_name)
        await forwarder.start()
        await _feed(forwarder, mixed)
        assert await forwarder.drain(60) == 0
        return forwarder

    forwarder = asyncio.run(scenario())

    assert forwarder.pending_offset(0) is None
    assert forwarder.pending_offset(1) is None
    for project, messages in ((named, from_resource), (unique_name, defaulted)):
        want = _ids(messages)
        got = phoenix.wait_for(project, want)
        assert len(got) == len(set(got)) == len(want), project
        assert set(got) == want, project
    assert forwarder.stats.accepted_spans == len(_ids(mixed))


def test_phoenix_stores_a_replayed_span_id_once_and_keeps_the_first(
    phoenixes: dict[str, Phoenix], unique_name: str
) -> None:
    """What a rebalance relies on: the next owner replays what the last one already sent."""
    phoenix = phoenixes["open"]
    messages = _messages(10)
    want = _ids(messages)

    async def send(messages: list[list[SpanItem]], *, renamed: bool) -> None:
        forwarder = _forwarder(phoenix, project=unique_name)
        for offset, spans in enumerate(messages):
            if renamed:
                for _, span in spans:
                    span.name = "replayed"
            await forwarder.add(spans, partition=0, offset=offset)
        assert await forwarder.drain(60) == 0

    asyncio.run(send(messages, renamed=False))
    phoenix.wait_for(unique_name, want)
    asyncio.run(send(messages, renamed=True))
    # Phoenix writes its queue in order: once a span sent after the replay is stored, the
    # replay has been through the writer too.
    marker = _messages(1)
    asyncio.run(send(marker, renamed=False))
    phoenix.wait_for(unique_name, want | _ids(marker))

    stored = [s for s in phoenix.stored(unique_name) if s["context"]["span_id"] in want]
    ids = [span["context"]["span_id"] for span in stored]
    assert len(ids) == len(set(ids)) == len(want)
    assert "replayed" not in {span["name"] for span in stored}, "the replay overwrote spans"


def test_auth_on_with_a_small_queue_every_span_arrives_despite_503s(
    phoenixes: dict[str, Phoenix], unique_name: str
) -> None:
    phoenix = phoenixes["locked"]
    messages = _messages(40)
    dead_letters = DeadLetters()

    async def scenario() -> SpanForwarder:
        forwarder = _forwarder(
            phoenix,
            project=unique_name,
            api_key=phoenix.api_key,
            dead_letters=dead_letters,
            max_in_flight=8,
            batch_spans=25,
        )
        await forwarder.start()
        await _feed(forwarder, messages)
        assert await forwarder.drain(120) == 0
        return forwarder

    forwarder = asyncio.run(scenario())

    assert forwarder.stats.retries_by_status.get("503", 0) > 0, (
        f"Phoenix never said its queue was full: {forwarder.stats}"
    )
    assert not dead_letters.batches
    want = _ids(messages)
    got = phoenix.wait_for(unique_name, want, timeout_s=120)
    assert len(got) == len(set(got)) == len(want)


def test_a_wrong_key_is_a_clear_error_and_nothing_is_dropped(
    phoenixes: dict[str, Phoenix], unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    phoenix = phoenixes["locked"]
    wrong_key = "not-a-phoenix-key-0123456789"
    messages = _messages(6)

    async def scenario() -> None:
        # At start-up the wrong key stops the worker with a message saying what to fix.
        forwarder = _forwarder(phoenix, project=unique_name, api_key=wrong_key)
        with pytest.raises(ConfigurationError, match="PHOENIX_API_KEY") as refused:
            await forwarder.start()
        assert wrong_key not in str(refused.value)
        assert "401" in str(refused.value)

        # Should the key stop working later (revoked), spans are held and offsets stay put.
        dead_letters = DeadLetters()
        forwarder = _forwarder(
            phoenix, project=unique_name, api_key=wrong_key, dead_letters=dead_letters
        )
        await _feed(forwarder, messages, partitions=1)
        await forwarder.flush()
        await asyncio.sleep(3)
        assert forwarder.stats.unauthorized
        assert forwarder.stats.retries_by_status.get("401", 0) >= 2
        assert forwarder.pending_offset(0) == 0, "an offset advanced past refused spans"
        assert not dead_letters.batches, "refused spans were dead-lettered (dropped)"
        undelivered = await forwarder.drain(1)
        assert undelivered == len(_ids(messages))

        # The operator fixes the key and the worker restarts: the replay delivers everything.
        fixed = _forwarder(phoenix, project=unique_name, api_key=phoenix.api_key)
        await fixed.start()
        await _feed(fixed, messages, partitions=1)
        assert await fixed.drain(60) == 0

    with caplog.at_level(logging.INFO, logger="processor"):
        asyncio.run(scenario())

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "PHOENIX_API_KEY" in errors[0]
    assert all(wrong_key not in r.getMessage() for r in caplog.records)
    good_key = phoenix.api_key
    assert good_key is not None
    assert all(good_key not in r.getMessage() for r in caplog.records)
    got = phoenix.wait_for(unique_name, _ids(messages))
    assert len(got) == len(set(got)) == len(_ids(messages))


def test_phoenix_killed_mid_stream_and_down_30_s_loses_nothing_and_stores_nothing_twice(
    phoenixes: dict[str, Phoenix], unique_name: str
) -> None:
    """Phoenix dies (kill -9, the hardest way to stop: its in-memory queue of accepted spans is
    gone) while spans flow, stays down 30 s, and is started again."""
    phoenix = phoenixes["open"]
    messages = _messages(50)  # ~1,000 spans
    batch_spans, max_in_flight = 50, 4
    # What may be held while Phoenix is away: the batches out, one partial batch, one message.
    held_bound = (max_in_flight + 1) * batch_spans + max(len(spans) for spans in messages)
    samples: list[tuple[int, int | None, int | None]] = []

    async def scenario() -> SpanForwarder:
        forwarder = _forwarder(
            phoenix,
            project=unique_name,
            batch_spans=batch_spans,
            max_in_flight=max_in_flight,
            retry_max_s=2.0,
        )
        await forwarder.start()
        feeding = asyncio.create_task(_feed(forwarder, messages))
        # Mid-stream: Phoenix has taken some batches and others are out.
        while not (forwarder.stats.accepted_batches >= 2 and forwarder.in_flight > 0):
            await asyncio.sleep(0.05)
        pid = phoenix.stack.status()["phoenix"].pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)  # the group of the Phoenix this module started
        killed_at = time.monotonic()
        await asyncio.sleep(1)  # the requests out at that moment fail
        while time.monotonic() - killed_at < OUTAGE_S:
            samples.append(
                (
                    forwarder.pending_spans(),
                    forwarder.pending_offset(0),
                    forwarder.pending_offset(1),
                )
            )
            await asyncio.sleep(1)
        assert not feeding.done(), "the feed was not held back while Phoenix was down"
        await asyncio.to_thread(phoenix.stack.start, "phoenix")
        await asyncio.wait_for(feeding, timeout=180)
        assert await forwarder.drain(180) == 0
        return forwarder

    forwarder = asyncio.run(scenario())
    stats = forwarder.stats

    # Backpressure: memory stays bounded while Phoenix is away ...
    assert max(held for held, _, _ in samples) <= held_bound, samples
    # ... and no offset advances while Phoenix writes nothing.
    assert len({(p0, p1) for _, p0, p1 in samples}) == 1, samples
    want = _ids(messages)
    # drain() returned once Phoenix had *written* every span: no polling needed here.
    got = phoenix.stored_ids(unique_name)
    assert len(got) == len(set(got)), "a span is stored twice"
    assert set(got) == want, (len(want - set(got)), "spans missing", stats)
