"""Several workers, kill -9 and rebalances: the MLflow rollups still equal the truth exactly.

Traffic is published in chunks while the workers run, so that a kill or a join lands in the
middle of the stream, with windows open and partials in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from processor.loadgen import GeneratedTrace, Scenario, TraceGenerator, Truth, publish_traces
from processor.stack import StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    mlflow_metric_values,
    mlflow_rollups,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
EXACT = (
    "spans",
    "errors",
    "invocations",
    "llm_calls",
    "tokens_prompt",
    "tokens_completion",
    "tokens_total",
    "late_spans",
)
PERCENTILES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
CHUNKS = 8


def _traffic(count: int, seed: int) -> tuple[list[GeneratedTrace], Truth]:
    start_ms = (time.time_ns() // 1_000_000) - 30 * 60 * 1000
    # latency_scale keeps traces short, so a modest allowed lateness covers them
    scenario = Scenario(agents=10, seed=seed, latency_scale=0.1)
    traces = list(TraceGenerator(scenario, start_ms=start_ms, rate=2.0).generate(count))
    return traces, Truth.from_traces(traces, window_size_ms=WINDOW_MS)


def _run(
    stack: StackEndpoints,
    name: str,
    work_dir: Path,
    *,
    traces: list[GeneratedTrace],
    truth: Truth,
    actions: dict[int, Callable[[list[WorkerProcess], dict[str, str]], None]],
    workers_at_start: int,
) -> None:
    env = worker_env(
        stack,
        name=name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(truth.max_trace_duration_ms) + 1_000),
        # Event times lie in the past, so an idle advance (watermark -> wall clock) would close
        # every window at once; keep it for the end of the traffic, after the last chunk.
        PROCESSOR_IDLE_TIMEOUT_MS="15000",
        PROCESSOR_PHOENIX_ENABLED="false",
    )
    workers = [
        WorkerProcess(env, work_dir / f"worker-{i}.log").start() for i in range(workers_at_start)
    ]
    try:
        size = len(traces) // CHUNKS + 1
        for chunk in range(CHUNKS):
            asyncio.run(
                publish_traces(
                    traces[chunk * size : (chunk + 1) * size],
                    bootstrap=stack.kafka_bootstrap,
                    topic=env["PROCESSOR_SPANS_TOPIC"],
                )
            )
            if chunk in actions:
                actions[chunk](workers, env)
            time.sleep(1.5)
        _assert_rollups_equal_truth(stack, name, truth)
    finally:
        for worker in workers:
            worker.stop()
    for worker in workers:
        assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _assert_rollups_equal_truth(stack: StackEndpoints, name: str, truth: Truth) -> None:
    expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

    def complete() -> dict | None:
        found = mlflow_rollups(stack.mlflow_url, name)
        # "spans" is the last metric written for a window: with it, the window is whole
        return found if all("spans" in found.get(key, {}) for key in expected) else None

    with contextlib.suppress(AssertionError):  # below says which windows are missing
        poll_until(complete, timeout_s=240, what="every window in MLflow")
    found = mlflow_rollups(stack.mlflow_url, name)
    missing = sorted(key for key in expected if "spans" not in found.get(key, {}))
    assert not missing, f"windows never written: {missing} (of {len(expected)})"
    assert set(found) == set(expected)
    for key, want in expected.items():
        got = found[key]
        for metric in EXACT:
            assert got[metric] == want.get(metric, 0), (key, metric, got[metric], want.get(metric))
        if want["invocations"]:
            for metric in PERCENTILES:
                assert got[metric] == pytest.approx(want[metric], rel=0.01), (key, metric)
    # Nothing counted twice: a replayed window may be written again, but only with the same
    # value; no metric point ever holds two different values.
    for key, values in mlflow_metric_values(stack.mlflow_url, name).items():
        assert len(values) == 1, (key, values)


def _kill(index: int) -> Callable[[list[WorkerProcess], dict[str, str]], None]:
    def action(workers: list[WorkerProcess], env: dict[str, str]) -> None:
        workers[index].kill()

    return action


def _restart(index: int) -> Callable[[list[WorkerProcess], dict[str, str]], None]:
    def action(workers: list[WorkerProcess], env: dict[str, str]) -> None:
        workers[index].start()

    return action


def _join(work_dir: Path) -> Callable[[list[WorkerProcess], dict[str, str]], None]:
    def action(workers: list[WorkerProcess], env: dict[str, str]) -> None:
        workers.append(WorkerProcess(env, work_dir / f"worker-{len(workers)}.log").start())

    return action


def test_two_workers_share_the_partitions(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces, truth = _traffic(count=480, seed=21)
    _run(stack, unique_name, work_dir, traces=traces, truth=truth, actions={}, workers_at_start=2)


def test_worker_killed_with_sigkill_mid_window_then_restarted(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces, truth = _traffic(count=480, seed=22)
    actions = {2: _kill(0), 4: _restart(0)}
    _run(
        stack,
        unique_name,
        work_dir,
        traces=traces,
        truth=truth,
        actions=actions,
        workers_at_start=2,
    )


def test_third_worker_joining_mid_stream(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces, truth = _traffic(count=480, seed=23)
    _run(
        stack,
        unique_name,
        work_dir,
        traces=traces,
        truth=truth,
        actions={3: _join(work_dir)},
        workers_at_start=2,
    )
