"""10% sampling on the real stack: Phoenix gets what matters, MLflow still counts everything."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import Scenario, TraceGenerator, Truth, UpstreamSampler, publish_traces
from processor.stack import StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
SLOW_MS = 8_000


def test_errors_and_slow_traces_reach_phoenix_and_counts_stay_exact(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    start_ms = (time.time_ns() // 1_000_000) - 20 * 60 * 1000
    scenario = Scenario(agents=10, seed=31, latency_scale=0.3)
    traces = list(TraceGenerator(scenario, start_ms=start_ms, rate=2.0).generate(400))
    truth = Truth.from_traces(traces, window_size_ms=WINDOW_MS)
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(truth.max_trace_duration_ms) + 1_000),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="0.1",
        PROCESSOR_SAMPLING_LATENCY_THRESHOLD_MS=str(SLOW_MS),
    )
    asyncio.run(
        publish_traces(traces, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"])
    )
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}
        found = poll_until(
            lambda: (
                (f if all("spans" in f.get(k, {}) for k in expected) else None)
                if (f := mlflow_rollups(stack.mlflow_url, unique_name))
                else None
            ),
            timeout_s=180,
            what="every window in MLflow",
        )
        # Rule 1: aggregates see every span, whatever Phoenix gets.
        for key, want in expected.items():
            for metric in ("spans", "errors", "tokens_total"):
                assert found[key][metric] == want[metric], (key, metric)

        def duration_ms(trace: object) -> float:
            spans = [
                s for rs in trace.request.resource_spans for ss in rs.scope_spans for s in ss.spans
            ]  # type: ignore[attr-defined]
            return (
                max(s.end_time_unix_nano for s in spans)
                - min(s.start_time_unix_nano for s in spans)
            ) / 1e6

        must = [t for t in traces if t.has_error or duration_ms(t) >= SLOW_MS]
        rest = [t for t in traces if t not in must]
        must_ids = {s.hex() for t in must for s in t.span_ids}
        got = poll_until(
            lambda: (
                ids
                if must_ids <= (ids := set(phoenix_span_ids(stack.phoenix_url, unique_name)))
                else None
            ),
            timeout_s=120,
            what="every error and slow trace in Phoenix",
        )
        time.sleep(3)  # let Phoenix write the last batches before counting the random share
        got = set(phoenix_span_ids(stack.phoenix_url, unique_name))
        kept_rest = [t for t in rest if t.span_ids[0].hex() in got]
        share = len(kept_rest) / len(rest)
        # 10% of the other traces, binomial: within 4 standard deviations
        sigma = (0.1 * 0.9 / len(rest)) ** 0.5
        assert abs(share - 0.1) < 4 * sigma + 0.01, share
        # a kept trace is kept whole, a dropped one not at all
        for trace in rest:
            kept = [s.hex() in got for s in trace.span_ids]
            assert all(kept) or not any(kept), trace.trace_id_hex
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def test_spans_sampled_upstream_count_with_their_adjusted_count(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    """Agents whose SDK keeps 25% of traces (th:c, adjusted count 4): MLflow reports 4 for
    every span received, says the counts are adjusted, and lands near the real traffic."""
    start_ms = (time.time_ns() // 1_000_000) - 20 * 60 * 1000
    scenario = Scenario(agents=4, seed=47, latency_scale=0.2)
    produced = list(TraceGenerator(scenario, start_ms=start_ms, rate=5.0).generate(800))
    sampler = UpstreamSampler(0.25)
    assert sampler.th == "c"
    published = [kept for trace in produced if (kept := sampler.sample(trace)) is not None]
    received = Truth.from_traces(published, window_size_ms=WINDOW_MS)
    population = Truth.from_traces(produced, window_size_ms=WINDOW_MS)
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(received.max_trace_duration_ms) + 1_000),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
    )
    asyncio.run(
        publish_traces(
            published, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"]
        )
    )
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    metrics = (
        "spans",
        "errors",
        "invocations",
        "llm_calls",
        "tokens_total",
        "upstream_sampled_spans",
        "counts_adjusted",
    )
    try:
        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in received.rollups}

        def every_window() -> dict[tuple[str, int], dict[str, float]] | None:
            found = mlflow_rollups(stack.mlflow_url, unique_name, metrics)
            # "spans" is the last metric written for a window: with it, the window is whole
            return found if all("spans" in found.get(k, {}) for k in expected) else None

        found = poll_until(
            every_window,
            timeout_s=180,
            what="every window in MLflow",
        )
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    for key, want in expected.items():
        got = found[key]
        assert got["counts_adjusted"] == 1, key
        assert got["upstream_sampled_spans"] == want["spans"], key
        for metric in ("spans", "errors", "invocations", "llm_calls", "tokens_total"):
            assert got[metric] == 4 * want[metric], (key, metric)  # type: ignore[literal-required]
    # Unbiased: the estimate of all spans lands near what the agents really produced.
    estimated = sum(found[key]["spans"] for key in expected if key[0] != ALL_AGENTS)
    produced_spans = sum(r["spans"] for r in population.rollups if r["agent"] != ALL_AGENTS)
    kept_share_sd = (0.25 * 0.75 / len(produced)) ** 0.5 / 0.25
    assert abs(estimated / produced_spans - 1) < 5 * kept_share_sd + 0.05, (
        estimated,
        produced_spans,
    )
