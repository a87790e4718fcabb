"""Cost and token kinds on the real stack: reported costs, costs priced from genai-prices'
table (OpenAI and Anthropic models, cache reads and writes, reasoning) and from the user's own
file, unknown models, both conventions; exact after a SIGKILL; per model with one setting."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from processor.core.pricing import OwnPrice, PriceTable
from processor.core.rollup import ALL_AGENTS
from processor.loadgen import GeneratedTrace, Scenario, TraceGenerator, Truth, publish_traces
from processor.loadgen.truth import TruthBuilder
from processor.stack import StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    assert_window_equals_truth,
    mlflow_metric_rows,
    mlflow_rollups,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
# The user's table overrides one model the catalogue knows, at prices far from its list price.
OWN_PRICES = {"gpt-4o-mini": {"input": 3.0, "output": 9.0, "cache_read": 0.3}}


def _traffic(count: int, seed: int) -> list[GeneratedTrace]:
    # Event time well in the past: every window can close as soon as the worker is idle.
    start_ms = (time.time_ns() // 1_000_000) - 20 * 60 * 1000
    generator = TraceGenerator(Scenario(agents=10, seed=seed), start_ms=start_ms, rate=2.0)
    return list(generator.generate(count))


def _truth(traces: list[GeneratedTrace], prices: PriceTable) -> Truth:
    builder = TruthBuilder(WINDOW_MS, prices=prices)
    for trace in traces:
        builder.add(trace)
    return builder.build()


def _totals(truth: Truth, metric: str) -> float:
    return sum(float(r[metric]) for r in truth.rollups if r["agent"] != ALL_AGENTS)


def _env(stack: StackEndpoints, name: str, work_dir: Path, lateness_ms: int, **extra: str):
    return worker_env(
        stack,
        name=name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(lateness_ms),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        PROCESSOR_SAMPLING_PROBABILITY="0.0",
        PROCESSOR_SAMPLING_KEEP_ERRORS="false",
        **extra,
    )


def test_cost_kinds_equal_the_truth_also_after_a_sigkill(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces = _traffic(count=240, seed=2201)
    own = {name: OwnPrice(**rates) for name, rates in OWN_PRICES.items()}
    truth = _truth(traces, PriceTable(own))
    catalogue_only = _truth(traces, PriceTable())
    # The traffic holds what the test is about: every source of cost, and calls without one.
    for metric in (
        "cost_reported_usd",
        "cost_estimated_usd",
        "unpriced_llm_calls",
        "tokens_cache_read",
        "tokens_cache_write",
        "tokens_reasoning",
    ):
        assert _totals(truth, metric) > 0, metric
    # The user's file changes the estimate, and only the estimate.
    assert _totals(truth, "cost_estimated_usd") != pytest.approx(
        _totals(catalogue_only, "cost_estimated_usd"), abs=1e-6
    )
    assert _totals(truth, "cost_reported_usd") == pytest.approx(
        _totals(catalogue_only, "cost_reported_usd"), abs=1e-9
    )

    prices_file = work_dir / "prices.json"
    prices_file.write_text(json.dumps(OWN_PRICES))
    lateness_ms = int(truth.max_trace_duration_ms) + 1_000
    env = _env(stack, unique_name, work_dir, lateness_ms, PROCESSOR_PRICES_FILE=str(prices_file))
    asyncio.run(
        publish_traces(traces, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"])
    )
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        # Killed while it writes the windows: some are in MLflow, the rest are replayed.
        poll_until(
            lambda: len(mlflow_rollups(stack.mlflow_url, unique_name, ("spans",))) or None,
            timeout_s=180,
            interval_s=0.2,
            what="the first windows in MLflow",
        )
        worker.kill()
        written_before = len(mlflow_rollups(stack.mlflow_url, unique_name, ("spans",)))
        worker = WorkerProcess(env, work_dir / "worker.log").start()

        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

        def all_windows_written() -> dict | None:
            found = mlflow_rollups(stack.mlflow_url, unique_name)
            done = all(key in found and "spans" in found[key] for key in expected)
            return found if done else None

        found = poll_until(all_windows_written, timeout_s=240, what="every window in MLflow")
        assert written_before < len(expected), "the kill came after the last window"
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        for key, want in expected.items():
            assert_window_equals_truth(key, found[key], want)
        # The replay after the kill wrote no second value for any window.
        assert set(mlflow_metric_rows(stack.mlflow_url, unique_name).values()) == {1}
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def test_cost_per_model_adds_up_to_each_agent_s_cost(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    traces = _traffic(count=120, seed=2202)
    prices = PriceTable()
    truth = _truth(traces, prices)
    lateness_ms = int(truth.max_trace_duration_ms) + 1_000
    env = _env(stack, unique_name, work_dir, lateness_ms, PROCESSOR_ROLLUP_BY_MODEL="true")
    asyncio.run(
        publish_traces(traces, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"])
    )
    # Each LLM call's model as the table names it: what the model dimension must hold.
    models_used = {
        prices.model_key(model, provider)
        for trace in traces
        for model, provider in _models_of(trace)
    }
    metrics = ("spans", "llm_calls", "tokens_prompt", "tokens_cache_read", "cost_usd")
    expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        # Complete once every span is in some series; where each one counts is checked below.
        def every_span() -> dict | None:
            found = _rollups_by_model(stack.mlflow_url, unique_name, metrics)
            spans = sum(
                values.get("spans", 0.0)
                for (agent, _, _), values in found.items()
                if agent != ALL_AGENTS
            )
            return found if spans >= truth.span_count else None

        found = poll_until(every_span, timeout_s=180, what="every span in MLflow")
    finally:
        worker.stop()
    assert {model for _, model, _ in found} == {"", *models_used}
    summed: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (agent, model, step), values in found.items():
        # The agent's invocations and tools: no LLM call among them (the all-agents series
        # has no model dimension: it holds every call).
        if model == "" and agent != ALL_AGENTS:
            assert values.get("llm_calls", 0) == 0, (agent, step)
        for metric in metrics:
            summed[(agent, step)][metric] += values.get(metric, 0.0)
    assert set(summed) == set(expected)
    for key, want in expected.items():
        for metric in metrics:
            assert summed[key][metric] == pytest.approx(float(want[metric]), abs=1e-9), (
                key,
                metric,
            )
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _models_of(trace: GeneratedTrace) -> list[tuple[str, str | None]]:
    """(model, provider) of each LLM call of ``trace``, read back from its published bytes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(trace.payload)
    found = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                values = {kv.key: kv.value.string_value for kv in span.attributes}
                is_llm = values.get("openinference.span.kind") == "LLM" or values.get(
                    "gen_ai.operation.name"
                ) in ("chat", "text_completion", "generate_content", "completion")
                model = next(
                    (
                        values[name]
                        for name in (
                            "llm.model_name",
                            "llm.response.model_name",
                            "gen_ai.response.model",
                            "gen_ai.request.model",
                        )
                        if values.get(name)
                    ),
                    "",
                )
                if is_llm and model:
                    provider = values.get("llm.provider") or values.get("gen_ai.provider.name")
                    found.append((model, provider or None))
    return found


def _rollups_by_model(
    mlflow_url: str, experiment_name: str, metrics: tuple[str, ...]
) -> dict[tuple[str, str, int], dict[str, float]]:
    """{(agent, model, window step): {metric: value}} from the runs' tags and histories."""
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    found: dict[tuple[str, str, int], dict[str, float]] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        agent = run.data.tags["agent"]
        model = run.data.tags.get("dimension.model", "")
        for metric in metrics:
            for point in client.get_metric_history(run.info.run_id, metric):
                found.setdefault((agent, model, point.step), {})[metric] = point.value
    return found
