"""A Kafka broker killed (SIGKILL) under live traffic, and what must hold after it restarts.

Shared by test_kafka_cluster.py (a node of a 3-broker cluster) and test_broker_restart.py (the
only broker). The run:

1. a worker (every role, as a process) starts and creates its topics;
2. the load generator publishes traces in real time, a few per second, from a thread;
3. once the worker is writing kept spans, the chosen broker is killed with SIGKILL;
4. ``while_down`` runs (a cluster checks that writes still go through), then the broker is
   started again and the traffic goes on a while longer before it stops;
5. every window's rollup in MLflow equals the truth of what was published, and Phoenix holds
   every kept span (each span id in the sampled topic) exactly once.

Event time is the wall clock, as for agents publishing live. While a partition's leader is away
its consumer gets nothing, its watermark follows the clock after the idle timeout, and the
traces published meanwhile arrive late by the length of the outage: the allowed lateness
(``lateness_ms``) is set to cover the outage, so that every span still counts in its window,
as the truth has it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiokafka import AIOKafkaConsumer

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import (
    GeneratedTrace,
    PublishStats,
    Scenario,
    TraceGenerator,
    Truth,
    publish_traces,
)
from processor.stack import StackEndpoints
from processor.worker.kept_spans import spans_of_record
from tests.integration.support import (
    ROLLUP_METRICS,
    WorkerProcess,
    assert_window_equals_truth,
    mlflow_metric_values,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

WINDOW_MS = 10_000
TRACES_PER_SECOND = 5.0
METRICS = (*ROLLUP_METRICS, "sampled_spans", "dropped_spans")
# Short traces (at most ~5 s): the lateness is there for the outage, not for the traces.
LATENCY_SCALE = 0.02


class Traffic:
    """The load generator publishing live in a thread of its own until stopped.

    Trace ``i`` is due ``i / rate`` seconds after the start and ends when it is made; a
    publisher held up by the outage gets the overdue ones at once. ``sent`` holds every trace
    the producer accepted, which `publish_traces` delivers before it returns (or raises)."""

    def __init__(self, bootstrap: str, topic: str, *, seed: int, rate: float) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._rate = rate
        self._generator = TraceGenerator(
            Scenario(agents=4, seed=seed, latency_scale=LATENCY_SCALE),
            start_ms=time.time_ns() // 1_000_000,
            rate=rate,
        )
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="traffic")
        self._published: Future[PublishStats] | None = None
        self.sent: list[GeneratedTrace] = []

    def start(self) -> Traffic:
        self._published = self._pool.submit(asyncio.run, self._publish())
        return self

    async def _publish(self) -> PublishStats:
        return await publish_traces(
            self._paced(), bootstrap=self._bootstrap, topic=self._topic, on_sent=self.sent.append
        )

    async def _paced(self) -> AsyncIterator[GeneratedTrace]:
        started = time.monotonic()
        index = 0
        while not self._stop.is_set():
            wait = started + index / self._rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, 0.2))
                continue
            yield self._generator.trace(index, end_ns=time.time_ns())
            index += 1

    def wait_for(self, count: int, *, timeout_s: float) -> None:
        """Wait until ``count`` traces have been handed to the producer in all."""
        poll_until(
            lambda: True if len(self._check().sent) >= count else None,
            timeout_s=timeout_s,
            interval_s=0.2,
            what=f"{count} traces published",
        )

    def _check(self) -> Traffic:
        if self._published is not None and self._published.done():
            self._published.result()  # raises what stopped the publisher
            raise AssertionError("the traffic stopped by itself")
        return self

    def stop(self, timeout_s: float = 180) -> PublishStats:
        """Stop making traces; returns once every accepted one is delivered."""
        self._stop.set()
        assert self._published is not None
        try:
            return self._published.result(timeout=timeout_s)
        finally:
            self._pool.shutdown(wait=False)


class BrokerFault(Protocol):
    """What a test does to its Kafka, given the worker's environment (its topics, group)."""

    def kill(self, env: dict[str, str]) -> None:
        """SIGKILL the chosen broker."""
        ...

    def while_down(self, env: dict[str, str], traffic: Traffic) -> None:
        """Check (or wait for) what must work while it is down."""
        ...

    def restart(self) -> None:
        """Start it again and wait until it answers."""
        ...


@dataclass(frozen=True)
class FaultRun:
    """What a run left for the test to look at beyond the rollups and Phoenix."""

    env: dict[str, str]
    truth: Truth
    kept_span_ids: set[str]


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    # Asked by name, a broker creates a missing topic: look it up among all topics first.
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        if topic not in await probe.topics():
            return {}
    finally:
        await probe.stop()
    # Subscribed without a group, a consumer is assigned every partition when it starts.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of each partition of ``topic`` (its records, on a topic of its own)."""
    return asyncio.run(_end_offsets(bootstrap, topic))


def wait_for_more_records(bootstrap: str, topic: str, *, more_than: int, what: str) -> int:
    """Wait until ``topic`` holds more than ``more_than`` records; returns how many it holds."""
    return poll_until(
        lambda: (
            total if (total := sum(end_offsets(bootstrap, topic).values())) > more_than else None
        ),
        timeout_s=180,
        interval_s=1,
        what=what,
    )


async def _span_ids_in(bootstrap: str, topic: str) -> list[str]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        ids: list[str] = []
        deadline = time.monotonic() + 120
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for tp, batch in (await consumer.getmany(timeout_ms=1_000)).items():
                for record in batch:
                    if record.offset < ends[tp]:
                        ids.extend(span.span_id.hex() for _, span in spans_of_record(record.value))
        return ids
    finally:
        await consumer.stop()


@contextmanager
def _running(worker: WorkerProcess) -> Iterator[WorkerProcess]:
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def run_through_broker_fault(
    *,
    kafka_bootstrap: str,
    services: StackEndpoints,
    name: str,
    work_dir: Path,
    fault: BrokerFault,
    lateness_ms: int,
    seed: int,
) -> FaultRun:
    """Steps 1-5 of the module's docstring; returns what the test may check further."""
    endpoints = StackEndpoints(
        kafka_bootstrap=kafka_bootstrap,
        phoenix_url=services.phoenix_url,
        mlflow_url=services.mlflow_url,
    )
    env = worker_env(
        endpoints,
        name=name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(lateness_ms),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="0.1",  # errors are kept too: some spans go, some not
        PROCESSOR_METRICS_HOST="127.0.0.1",
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_REGISTRY_DIR=str(work_dir / "registry"),
    )
    spans_topic, sampled_topic = env["PROCESSOR_SPANS_TOPIC"], env["PROCESSOR_SAMPLED_TOPIC"]
    worker = WorkerProcess(env, work_dir / "worker.log")
    with _running(worker):

        def alive() -> None:
            assert worker.process is not None
            assert worker.process.poll() is None, worker.log()[-3000:]

        def worker_topics_exist() -> bool | None:
            alive()
            return True if end_offsets(kafka_bootstrap, sampled_topic) else None

        poll_until(worker_topics_exist, timeout_s=180, what="the worker to create its topics")
        traffic = Traffic(kafka_bootstrap, spans_topic, seed=seed, rate=TRACES_PER_SECOND).start()
        try:
            # Mid-stream: the worker is reading, sampling and writing kept spans.
            wait_for_more_records(
                kafka_bootstrap, sampled_topic, more_than=0, what="the worker's first kept spans"
            )
            alive()
            fault.kill(env)
            fault.while_down(env, traffic)
            fault.restart()
            # Traffic after the restart too, through the broker that came back.
            traffic.wait_for(len(traffic.sent) + int(10 * TRACES_PER_SECOND), timeout_s=120)
            alive()
        finally:
            traffic.stop()
        truth = Truth.from_traces(traffic.sent, window_size_ms=WINDOW_MS)
        assert truth.max_trace_duration_ms + 1_000 < lateness_ms
        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

        def all_windows_written() -> dict[tuple[str, int], dict[str, float]] | None:
            alive()
            found = mlflow_rollups(services.mlflow_url, name, METRICS)
            # A window's metrics land in one write, and `spans` is read first: a window that
            # has it was read whole.
            done = all(key in found and "spans" in found[key] for key in expected)
            return found if done else None

        found = poll_until(
            all_windows_written,
            timeout_s=lateness_ms / 1000 + 240,
            interval_s=2,
            what="every window in MLflow",
        )
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        for key, want in expected.items():
            assert_window_equals_truth(key, found[key], want)
            got = found[key]
            assert got["sampled_spans"] + got["dropped_spans"] == got["spans"], (key, got)
        # A window may be written again after a replay, but never with another value.
        values = mlflow_metric_values(services.mlflow_url, name)
        assert {key: v for key, v in values.items() if len(v) > 1} == {}

        # Every kept span reaches Phoenix, once. The sampled topic is complete: every window
        # is closed, so every trace is decided. A replay may have written a record again.
        kept = set(asyncio.run(_span_ids_in(kafka_bootstrap, sampled_topic)))
        assert len(kept) == sum(
            int(metrics["sampled_spans"])
            for (agent, _), metrics in found.items()
            if agent != ALL_AGENTS
        )
        all_span_ids = {span_id.hex() for trace in traffic.sent for span_id in trace.span_ids}
        assert kept and kept < all_span_ids

        def all_kept_in_phoenix() -> list[str] | None:
            alive()
            stored = phoenix_span_ids(services.phoenix_url, name)
            return stored if kept <= set(stored) else None

        stored = poll_until(
            all_kept_in_phoenix, timeout_s=240, interval_s=2, what="every kept span in Phoenix"
        )
        assert len(stored) == len(set(stored)), "a span is in Phoenix twice"
        assert set(stored) == kept, "Phoenix holds spans that were not kept"
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    return FaultRun(env=env, truth=truth, kept_span_ids=kept)
