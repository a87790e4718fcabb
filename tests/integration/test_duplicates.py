"""Spans delivered twice, as at-least-once producers deliver them, count once.

Whole messages published again a few messages later, spans repeated inside their message, spans
published again on their own; a worker killed with SIGKILL in the middle of the stream and
started again, so that it replays from its last commit. MLflow must equal the truth exactly:
every span counted once, every copy in ``duplicate_spans``; Phoenix holds each span once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import (
    Delivery,
    Redelivery,
    Scenario,
    TraceGenerator,
    TruthBuilder,
    publish_traces,
)
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


def test_spans_delivered_twice_count_once_through_a_crash(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    # Event time well in the past: every window can close as soon as the worker is idle.
    start_ms = (time.time_ns() // 1_000_000) - 15 * 60 * 1000
    # Short traces (a tenth of the usual durations), so that the allowed lateness, which covers
    # the longest trace, is short too: the first half's newest spans then close its first
    # windows, which reach MLflow before the worker is killed.
    scenario = Scenario(agents=10, seed=23, latency_scale=0.1)
    generator = TraceGenerator(scenario, start_ms=start_ms, rate=2.0)
    traces = list(generator.generate(240))
    redelivery = Redelivery(fraction=0.3, seed=23)
    deliveries = [d for trace in traces for d in redelivery.deliveries(trace)]
    deliveries += redelivery.drain()
    builder = TruthBuilder(WINDOW_MS)
    for delivery in deliveries:
        if delivery.first:
            builder.add(delivery.trace)
        builder.add_copies(delivery.trace, delivery.copies)
    truth = builder.build()
    copies = sum(r["duplicate_spans"] for r in truth.rollups if r["agent"] != ALL_AGENTS)
    assert copies > 50  # the stream holds copies of every kind (a unit test checks the kinds)

    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(truth.max_trace_duration_ms) + 1_000),
        # Longer than the worker takes from the first half's last message to its kill: an
        # idle advance would make the second half late (the wall clock is far ahead of it).
        PROCESSOR_IDLE_TIMEOUT_MS="45000",
        PROCESSOR_SAMPLING_PROBABILITY="1.0",  # every span to Phoenix: checked one by one
    )
    topic = env["PROCESSOR_SPANS_TOPIC"]
    half = len(deliveries) // 2
    _publish(stack, topic, deliveries[:half])
    expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        # Some windows out, then the worker dies where it stands: it restarts from its last
        # commit and meets the copies of that stretch again, and their originals.
        poll_until(
            lambda: len(mlflow_rollups(stack.mlflow_url, unique_name)) or None,
            timeout_s=180,
            what="a first window in MLflow",
        )
        worker.kill()
        _publish(stack, topic, deliveries[half:])
        worker.start()

        seen: dict = {}

        def all_windows_written() -> dict | None:
            seen.update(found := mlflow_rollups(stack.mlflow_url, unique_name))
            done = all(key in found and "spans" in found[key] for key in expected)
            return found if done else None

        try:
            found = poll_until(all_windows_written, timeout_s=240, what="every window in MLflow")
        except AssertionError as exc:
            missing = sorted(key for key in expected if "spans" not in seen.get(key, {}))
            raise AssertionError(f"{exc}: {len(missing)} missing, e.g. {missing[:5]}") from exc
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        for key, want in expected.items():
            assert_window_equals_truth(key, found[key], want)
        assert (
            sum(found[key]["duplicate_spans"] for key in expected if key[0] != ALL_AGENTS) == copies
        )
        # All agents' copies: the same.
        every = [key for key in expected if key[0] == ALL_AGENTS]
        assert sum(found[key]["duplicate_spans"] for key in every) == copies
        # One row per metric and window: the replay wrote nothing twice.
        assert set(mlflow_metric_rows(stack.mlflow_url, unique_name).values()) == {1}

        want_ids = {span_id.hex() for trace in traces for span_id in trace.span_ids}
        got = poll_until(
            lambda: (
                ids
                if want_ids <= set(ids := phoenix_span_ids(stack.phoenix_url, unique_name))
                else None
            ),
            timeout_s=180,
            what="every span in Phoenix",
        )
        assert sorted(got) == sorted(want_ids), "Phoenix holds a span twice, or one not sent"
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _publish(stack: StackEndpoints, topic: str, deliveries: list[Delivery]) -> None:
    asyncio.run(publish_traces(deliveries, bootstrap=stack.kafka_bootstrap, topic=topic))
