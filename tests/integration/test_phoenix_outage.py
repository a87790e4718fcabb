"""Phoenix down, with the roles split over two worker processes: only `forward` lags.

Ops run ``trace-processor worker --roles aggregate,finalize`` and ``--roles forward`` apart.
This test gives them a Phoenix of its own, which it kills and later starts again (same data
folder, same port), and shows on the real services:

- while Phoenix is down, every window's rollup still reaches MLflow and matches the loadgen
  truth: the numbers never wait for Phoenix;
- the forward worker, killed with SIGKILL while Phoenix is still down and started again,
  resumes from its last commit; once Phoenix is back, it holds every kept span of the sampled
  topic exactly once, and the forward lag is back at 0.

Traffic comes in two parts. The first is forwarded while Phoenix is up, so the forward group
has committed offsets and Phoenix holds spans when the outage begins; the second arrives
during the outage. The first part's event time lies well in the past; once it is read, the
idle partitions' watermarks follow the clock, so the second part's event time starts just
ahead of the clock (its windows close a little after they end).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import GeneratedTrace, Scenario, TraceGenerator, Truth, publish_traces
from processor.settings import StackSettings
from processor.stack import LocalStack, StackEndpoints
from processor.worker.kept_spans import spans_of_record
from processor.worker.observability import WorkerRegistry
from tests.integration.support import (
    ROLLUP_METRICS,
    WorkerProcess,
    assert_window_equals_truth,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
METRICS = (*ROLLUP_METRICS, "sampled_spans", "dropped_spans")
# At this scale these seeds' traces last at most ~2 s, so the allowed lateness (and the wait
# for the second part's last windows to close) stays short.
LATENCY_SCALE = 0.02
SEED_BEFORE, SEED_DURING = 31, 33
AHEAD_MS = 10_000  # the second part's event time starts this far ahead of the clock
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A Phoenix of this test's own (not started yet), which it may kill and restart."""
    # Below Linux's ephemeral port range (32768-60999): a client retrying to connect to a port
    # in that range while nothing listens can be given it as its own source port, connect to
    # itself, and keep the restarted Phoenix from binding it (see test_phoenix_forwarding).
    port = int(os.environ.get("TEST_PHOENIX_OUTAGE_PORT", "29106"))
    settings = StackSettings(
        dir=tmp_path_factory.mktemp("phoenix-outage"),
        phoenix_port=port,
        phoenix_grpc_port=port + 11,
        # Only Phoenix is started; these keep anything from defaulting to 9092/5000.
        kafka_port=port + 86,
        kafka_controller_port=port + 87,
        mlflow_port=port + 394,
        start_timeout_s=600,
    )
    local = LocalStack(settings)
    try:
        yield local
    finally:
        local.down(services=("phoenix",))


def _traffic(count: int, *, seed: int, start_ms: int, rate: float) -> list[GeneratedTrace]:
    scenario = Scenario(agents=4, seed=seed, latency_scale=LATENCY_SCALE)
    return list(TraceGenerator(scenario, start_ms=start_ms, rate=rate).generate(count))


def _by_window(truth: Truth) -> dict[tuple[str, int], Any]:
    """The truth's rollups by (agent, window step), as `mlflow_rollups` keys what it finds."""
    return {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=5)
    except httpx.TransportError:
        return False
    return True


def _scrape(base: str) -> Samples | None:
    try:
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == f"trace_processor_{name}"
        and all((k, v) in sample_labels for k, v in labels.items())
    )


class Forwarder:
    """The `--roles forward` worker as ops see it: a process with a /metrics endpoint."""

    def __init__(self, env: dict[str, str], work_dir: Path, worker_id: str) -> None:
        self.worker_id = worker_id
        self.process = WorkerProcess(
            {**env, "PROCESSOR_WORKER_ID": worker_id},
            work_dir / f"{worker_id}.log",
            args=("--roles", "forward"),
        )
        self._registry = WorkerRegistry(Path(env["PROCESSOR_REGISTRY_DIR"]))
        self._base: str | None = None

    def start(self) -> Forwarder:
        self.process.start()
        return self

    @property
    def base(self) -> str:
        if self._base is None:

            def registered() -> str | None:
                self.check_alive()
                workers = self._registry.workers()
                return next((w.url for w in workers if w.worker_id == self.worker_id), None)

            self._base = poll_until(
                registered, timeout_s=120, interval_s=0.5, what=f"{self.worker_id} registered"
            )
        return self._base

    def check_alive(self) -> None:
        process = self.process.process
        assert process is not None and process.poll() is None, self.process.log()[-3000:]

    def samples(self) -> Samples | None:
        self.check_alive()
        return _scrape(self.base)

    def metric(self, name: str, **labels: str) -> float | None:
        samples = self.samples()
        return None if samples is None else _sum(samples, name, **labels)

    def wait_for(
        self, what: str, test: Callable[[Samples], bool], *, timeout_s: float = 180
    ) -> Samples:
        def probe() -> Samples | None:
            samples = self.samples()
            return samples if samples is not None and test(samples) else None

        return poll_until(probe, timeout_s=timeout_s, interval_s=0.5, what=what)


async def _reader(bootstrap: str, topic: str) -> AIOKafkaConsumer | None:
    """A started consumer without a group, assigned every partition of ``topic``; None while
    the worker has not created the topic (asking a broker for a topic by name creates it,
    with one partition)."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        if topic not in await probe.topics():
            return None
    finally:
        await probe.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    return consumer


async def _sampled_topic(bootstrap: str, topic: str) -> tuple[list[str], int]:
    """Every span id of every record in the sampled topic, and how many records it holds."""
    consumer = await _reader(bootstrap, topic)
    if consumer is None:
        return [], 0
    try:
        partitions = list(consumer.assignment())
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        ids: list[str] = []
        records = 0

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        deadline = time.monotonic() + 60
        while await behind():
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batches = await consumer.getmany(timeout_ms=1_000)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset >= ends[tp]:
                        continue
                    records += 1
                    ids.extend(span.span_id.hex() for _, span in spans_of_record(record.value))
        return ids, records
    finally:
        await consumer.stop()


async def _progress(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(records written to ``topic``, records of it ``group`` has committed), summed over its
    partitions. The topics are new, so offsets count records."""
    consumer = await _reader(bootstrap, topic)
    if consumer is None:
        return 0, 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        committed = await admin.list_consumer_group_offsets(group)
        done = sum(m.offset for tp, m in committed.items() if tp.topic == topic and m.offset > 0)
        return sum(ends.values()), done
    finally:
        await admin.close()
        await consumer.stop()


def _kill_phoenix(phoenix: LocalStack) -> None:
    pid = phoenix.status()["phoenix"].pid
    assert pid is not None, "this test's Phoenix is not running"
    os.killpg(pid, signal.SIGKILL)  # its whole group: `phoenix serve` forks workers
    poll_until(
        lambda: True if not _answers(phoenix.endpoints.phoenix_url) else None,
        timeout_s=30,
        what="the killed Phoenix to stop answering",
    )


def test_phoenix_down_only_forward_lags_and_every_kept_span_arrives_once(
    stack: StackEndpoints, unique_name: str, work_dir: Path, phoenix: LocalStack
) -> None:
    phoenix_url = phoenix.endpoints.phoenix_url
    assert not _answers(phoenix_url), f"something else answers at {phoenix_url}"
    starting = ThreadPoolExecutor(max_workers=1)
    phoenix_up: Future[StackEndpoints] = starting.submit(phoenix.up, ("phoenix",))

    before = _traffic(40, seed=SEED_BEFORE, start_ms=_now_ms() - 15 * 60 * 1000, rate=2.0)
    # A trace's shape depends on its seed and index only: these are the second part's traces,
    # generated here to size the lateness, and again below at the event time they get.
    sizing = _traffic(200, seed=SEED_DURING, start_ms=_now_ms(), rate=20.0)
    lateness_ms = int(max(Truth.from_traces(t).max_trace_duration_ms for t in (before, sizing)))
    lateness_ms += 1_000  # every span counts in its own window, as the truth has it
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PHOENIX_COLLECTOR_ENDPOINT=phoenix_url,
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(lateness_ms),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="0.1",  # errors are kept too: some spans go, some not
        # Small batches and few of them out: while Phoenix is down the forward worker fills
        # its request slots and pauses, with most of the outage's records not even read.
        PROCESSOR_PHOENIX_BATCH_SPANS="100",
        PROCESSOR_PHOENIX_MAX_IN_FLIGHT="2",
        PROCESSOR_PHOENIX_BATCH_INTERVAL_MS="200",
        PROCESSOR_PHOENIX_RETRY_MAX_MS="2000",
        PROCESSOR_METRICS_HOST="127.0.0.1",
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_REGISTRY_DIR=str(work_dir / "registry"),
    )
    sampled_topic = env["PROCESSOR_SAMPLED_TOPIC"]
    forward_group = f"{unique_name}.forward"

    def progress(topic: str, group: str = unique_name) -> tuple[int, int]:
        return asyncio.run(_progress(stack.kafka_bootstrap, topic, group))

    asyncio.run(
        publish_traces(before, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"])
    )

    aggregating = WorkerProcess(
        {**env, "PROCESSOR_WORKER_ID": f"{unique_name}-aggregate"},
        work_dir / "aggregate.log",
        args=("--roles", "aggregate,finalize"),
    ).start()
    forwarders = [Forwarder(env, work_dir, f"{unique_name}-forward-1").start()]
    try:
        phoenix_up.result(timeout=660)

        # -- Phoenix up: the first part is forwarded and its offsets committed ---------------
        def first_part_in_phoenix() -> tuple[list[str], list[str], int] | None:
            topic_ids, records = asyncio.run(_sampled_topic(stack.kafka_bootstrap, sampled_topic))
            forwarders[0].check_alive()
            if not topic_ids or progress(sampled_topic, forward_group) != (records, records):
                return None  # not every kept span is committed, so not every one written
            stored = phoenix_span_ids(phoenix_url, unique_name)
            return (stored, topic_ids, records) if set(topic_ids) <= set(stored) else None

        stored_before, ids_before, records_before = poll_until(
            first_part_in_phoenix, timeout_s=240, interval_s=1, what="the first part in Phoenix"
        )
        assert len(stored_before) == len(set(stored_before)), "a span is in Phoenix twice"
        assert set(stored_before) == set(ids_before)

        # -- Phoenix down: the second part arrives --------------------------------------------
        _kill_phoenix(phoenix)
        connection_retries = forwarders[0].metric("phoenix_retries_total", status="connection")
        assert connection_retries is not None
        during = _traffic(200, seed=SEED_DURING, start_ms=_now_ms() + AHEAD_MS, rate=20.0)
        truth = Truth.from_traces([*before, *during], window_size_ms=WINDOW_MS)
        assert int(truth.max_trace_duration_ms) + 1_000 <= lateness_ms
        asyncio.run(
            publish_traces(
                during, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"]
            )
        )

        expected = _by_window(truth)
        during_windows = set(_by_window(Truth.from_traces(during, window_size_ms=WINDOW_MS)))

        def all_windows_written() -> dict | None:
            assert aggregating.process is not None
            assert aggregating.process.poll() is None, aggregating.log()[-3000:]
            found = mlflow_rollups(stack.mlflow_url, unique_name, METRICS)
            done = all(key in found and "sampled_spans" in found[key] for key in expected)
            return found if done else None

        found = poll_until(
            all_windows_written, timeout_s=240, interval_s=2, what="every window in MLflow"
        )
        # The rollups above were written while Phoenix was away, and it still is.
        assert not _answers(phoenix_url), "Phoenix answered during the outage"
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        assert during_windows and during_windows <= set(found)
        for key, want in expected.items():
            got = found[key]
            assert_window_equals_truth(key, got, want)
            # Sampling decided the fate of every span of the window, one way or the other.
            assert got["sampled_spans"] + got["dropped_spans"] == got["spans"], (key, got)
        agents = [m for (agent, _), m in found.items() if agent != ALL_AGENTS]
        sampled_total = sum(int(metrics["sampled_spans"]) for metrics in agents)
        assert sampled_total > 0 and sum(m["dropped_spans"] for m in agents) > 0
        # Aggregate committed every span it read, finalize every partial written so far (each
        # source partition keeps sending progress marks to the partials topic, so that one
        # never stands still): neither waits for Phoenix.
        spans_topic, partials_topic = env["PROCESSOR_SPANS_TOPIC"], env["PROCESSOR_PARTIALS_TOPIC"]
        partials_written, _ = progress(partials_topic)

        def aggregating_group_caught_up() -> bool | None:
            written, committed = progress(spans_topic)
            if not written == committed == len(before) + len(during):
                return None
            return True if progress(partials_topic)[1] >= partials_written > 0 else None

        poll_until(
            aggregating_group_caught_up,
            timeout_s=60,
            what=f"group {unique_name} to commit what it read of {spans_topic}, {partials_topic}",
        )

        # Every window is closed, so every kept span is in the sampled topic: the outage's
        # records are there, unforwarded, and the forward worker says it is behind by all of
        # them (paused while its request slots are full, it reads the lag from the broker).
        ids_all, records_all = asyncio.run(_sampled_topic(stack.kafka_bootstrap, sampled_topic))
        outage_records = records_all - records_before
        assert outage_records > 0 and set(ids_before) < set(ids_all)
        first = forwarders[0].wait_for(
            "the forward worker to read some of the outage's records",
            lambda s: (
                _sum(s, "forward_records_total") > records_before
                and _sum(s, "forward_lag_messages") == outage_records
            ),
        )
        assert _sum(first, "phoenix_retries_total", status="connection") > connection_retries
        # Nothing is committed while Phoenix writes nothing.
        assert progress(sampled_topic, forward_group) == (records_all, records_before)

        # -- the forward worker dies (kill -9) and comes back, Phoenix still down -------------
        forwarders[0].process.kill()
        forwarders.append(Forwarder(env, work_dir, f"{unique_name}-forward-2").start())
        second = forwarders[1].wait_for(
            "the restarted forward worker to read again what was not in Phoenix",
            lambda s: (
                _sum(s, "forward_records_total") > 0
                and _sum(s, "phoenix_retries_total", status="connection") > 0
                and _sum(s, "forward_lag_messages") == outage_records
            ),
        )
        # It resumed at the group's commit: past the first part, not past any outage record.
        assert _sum(second, "forward_records_total") <= outage_records
        assert progress(sampled_topic, forward_group) == (records_all, records_before)
        assert not _answers(phoenix_url), "Phoenix answered during the outage"

        # -- Phoenix back (same data folder and port): everything arrives, once ---------------
        phoenix.start("phoenix")
        forwarders[1].wait_for(
            "the forward lag back at 0",
            lambda s: (
                _sum(s, "forward_lag_messages") == 0
                and _sum(s, "forward_records_total") >= outage_records
            ),
            timeout_s=300,
        )
        want = set(ids_all)
        stored = poll_until(
            lambda: ids if want <= set(ids := phoenix_span_ids(phoenix_url, unique_name)) else None,
            timeout_s=120,
            what="every kept span in Phoenix",
        )
        assert len(stored) == len(set(stored)), "a span is in Phoenix twice"
        assert set(stored) == want, (len(set(stored) - want), "spans Phoenix should not have")
        assert len(stored) == sampled_total, "MLflow's sampled_spans disagree with Phoenix"
        assert len(ids_all) == len(want), "a kept span was written to the sampled topic twice"
        assert progress(sampled_topic, forward_group) == (records_all, records_all)
    finally:
        starting.shutdown(wait=False)
        for forwarder in forwarders:
            forwarder.process.stop()
        aggregating.stop()
    for process in (aggregating, *(f.process for f in forwarders)):
        assert "Traceback" not in process.log(), process.log()[-3000:]
