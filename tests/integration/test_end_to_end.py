"""The whole path on real services: loadgen traffic -> Kafka -> worker -> Phoenix and MLflow."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from processor.loadgen import Scenario, TraceGenerator, Truth, publish_traces
from processor.stack import StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    assert_window_equals_truth,
    mlflow_metric_rows,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000


def _traffic(count: int, seed: int) -> tuple[list, Truth]:
    # Event time well in the past: every window can close as soon as the worker is idle.
    start_ms = (time.time_ns() // 1_000_000) - 15 * 60 * 1000
    generator = TraceGenerator(Scenario(agents=10, seed=seed), start_ms=start_ms, rate=2.0)
    traces = list(generator.generate(count))
    return traces, Truth.from_traces(traces, window_size_ms=WINDOW_MS)


def test_spans_reach_phoenix_and_rollups_reach_mlflow_exactly(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces, truth = _traffic(count=240, seed=11)
    lateness_ms = int(truth.max_trace_duration_ms) + 1_000
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(lateness_ms),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="1.0",  # every span to Phoenix: checked one by one
    )
    asyncio.run(
        publish_traces(traces, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"])
    )
    # A message that is not OTLP must end in the dead-letter topic, not stop the worker.
    asyncio.run(_publish_raw(stack.kafka_bootstrap, env["PROCESSOR_SPANS_TOPIC"], b"\x0a\xff"))

    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

        def all_windows_written() -> dict | None:
            found = mlflow_rollups(stack.mlflow_url, unique_name)
            done = all(key in found and "spans" in found[key] for key in expected)
            return found if done else None

        found = poll_until(all_windows_written, timeout_s=180, what="every window in MLflow")
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        for key, want in expected.items():
            assert_window_equals_truth(key, found[key], want)

        # One row per metric and window: nothing was written twice.
        rows = mlflow_metric_rows(stack.mlflow_url, unique_name)
        assert set(rows.values()) == {1}

        # Every span is in Phoenix (it ingests asynchronously: poll).
        want_ids = {span_id.hex() for trace in traces for span_id in trace.span_ids}
        got_ids = poll_until(
            lambda: (
                ids
                if want_ids <= (ids := set(phoenix_span_ids(stack.phoenix_url, unique_name)))
                else None
            ),
            timeout_s=120,
            what="every span in Phoenix",
        )
        assert got_ids == want_ids

        letters = asyncio.run(_read_all(stack.kafka_bootstrap, env["PROCESSOR_DEAD_LETTER_TOPIC"]))
        assert [dict(h)["reason"] for h in letters] == [b"invalid_protobuf"]
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


async def _publish_raw(bootstrap: str, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"not-otlp")
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str) -> list[list[tuple[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5_000)
        return [list(record.headers) for records in batches.values() for record in records]
    finally:
        await consumer.stop()
