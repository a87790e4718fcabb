"""Agents publishing through the OpenTelemetry SDK: the LangGraph example, a real worker, and the
numbers per agent in MLflow and Phoenix.

The example runs as its own process, configured only by the environment a deployment gives it
(``KAFKA_BOOTSTRAP_SERVERS``, ``PROCESSOR_SPANS_TOPIC``). The expected rollups are computed from
what it actually published (read back from Kafka) with the loadgen's independent truth code,
and checked against what the example's fake models report: the agents get the tokens their
model calls reported, no more, no less.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import Scenario, TraceGenerator, Truth, TruthBuilder, ensure_topic
from processor.publishing import KafkaSpanExporter
from processor.stack import StackEndpoints
from tests.integration.support import (
    WorkerProcess,
    mlflow_rollups,
    phoenix_span_ids,
    poll_until,
    worker_env,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "langgraph_two_agents.py"
WINDOW_MS = 5_000
LATENESS_MS = 3_000
PARTITIONS = 4
QUESTIONS = 4
EXACT = ("spans", "errors", "invocations", "llm_calls", "tokens_prompt", "tokens_completion",
         "tokens_total", "late_spans")  # fmt: skip
# What the example's fake models report per call (examples/langgraph_two_agents.py).
USAGE = {"researcher": [(120, 45)], "writer": [(310, 160), (190, 20)]}


def test_langgraph_example_spans_are_attributed_to_their_agents(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    pytest.importorskip("langgraph")
    pytest.importorskip("openinference.instrumentation.langchain")
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS=str(LATENESS_MS),
        # Windows close on the closers' data. An idle advance could close a partition's
        # windows before the worker has handled its messages: it judges a partition caught up
        # by what faust fetched, not by what aggregate handled.
        PROCESSOR_IDLE_TIMEOUT_MS="60000",
        PROCESSOR_SAMPLING_PROBABILITY="1.0",  # every span to Phoenix: checked one by one
    )
    topic = env["PROCESSOR_SPANS_TOPIC"]
    asyncio.run(ensure_topic(bootstrap=stack.kafka_bootstrap, topic=topic, partitions=PARTITIONS))
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        agent = subprocess.run(
            [sys.executable, str(EXAMPLE), "--questions", str(QUESTIONS), "--project", unique_name],
            env={
                **{
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("KAFKA_", "PROCESSOR_"))
                },
                "KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap,
                "PROCESSOR_SPANS_TOPIC": topic,
                "PYTHONPATH": str(ROOT),
            },
            capture_output=True,
            timeout=180,
        )
        assert agent.returncode == 0, agent.stderr.decode(errors="replace")[-3000:]

        records = asyncio.run(_read_all(stack.kafka_bootstrap, topic))
        truth, span_ids = _truth_of(records)
        _assert_publisher_facts(records, truth)
        asyncio.run(_publish_closers(stack.kafka_bootstrap, topic, f"{unique_name}-closers"))

        expected = {(r["agent"], r["window_start_ms"] // WINDOW_MS): r for r in truth.rollups}

        def all_windows_written() -> dict | None:
            found = mlflow_rollups(stack.mlflow_url, unique_name)
            done = all(set(EXACT) <= set(found.get(key, ())) for key in expected)
            return found if done else None

        found = poll_until(all_windows_written, timeout_s=120, what="every window in MLflow")
        found = {key: value for key, value in found.items() if key[0] != "closer"}
        assert set(found) == set(expected), "MLflow holds windows the truth does not"
        for key, want in expected.items():
            for metric in EXACT:
                assert found[key][metric] == want.get(metric, 0), (key, metric, found[key])

        got_ids = poll_until(
            lambda: (
                ids
                if len(ids := set(phoenix_span_ids(stack.phoenix_url, unique_name)))
                >= len(span_ids)
                else None
            ),
            timeout_s=60,
            what="every span in Phoenix",
        )
        assert got_ids == span_ids
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _assert_publisher_facts(records: list[ConsumerRecord], truth: Truth) -> None:
    """What the exporter and the agent naming promise, read off the topic itself."""
    for record in records:
        assert dict(record.headers) == {"content-type": b"application/x-protobuf"}
        request = ExportTraceServiceRequest.FromString(record.value)
        trace_ids = {
            span.trace_id.hex()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        assert trace_ids == {record.key.decode("ascii")}, "one trace per message, keyed by it"
    assert truth.trace_count == QUESTIONS
    per_agent: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for rollup in truth.rollups:
        if rollup["agent"] == ALL_AGENTS:
            continue
        totals = per_agent[rollup["agent"]]
        totals["invocations"] += rollup["invocations"]
        totals["llm_calls"] += rollup["llm_calls"]
        totals["tokens_prompt"] += rollup["tokens_prompt"]
        totals["tokens_completion"] += rollup["tokens_completion"]
    assert set(per_agent) == {"orchestrator", "researcher", "writer"}
    assert per_agent["orchestrator"]["invocations"] == QUESTIONS  # the graph's root span
    assert per_agent["orchestrator"]["llm_calls"] == 0
    for name, calls in USAGE.items():
        assert per_agent[name]["invocations"] == QUESTIONS
        assert per_agent[name]["llm_calls"] == QUESTIONS * len(calls)
        assert per_agent[name]["tokens_prompt"] == QUESTIONS * sum(p for p, _ in calls)
        assert per_agent[name]["tokens_completion"] == QUESTIONS * sum(c for _, c in calls)


async def _publish_closers(bootstrap: str, topic: str, project: str) -> None:
    """A trace on each partition ending one window and the lateness from now: every partition's
    watermark passes the example's windows, which close on data, not on the idle timeout."""
    end_ms = time.time_ns() // 1_000_000 + WINDOW_MS + LATENESS_MS
    scenario = Scenario(agents=1, trace_size=4, seed=5, latency_scale=0.01, service_name="closer")
    generator = TraceGenerator(scenario, start_ms=end_ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for partition in range(PARTITIONS):
            trace = generator.trace(partition, end_ns=end_ms * 1_000_000)
            request = ExportTraceServiceRequest()
            request.CopyFrom(trace.request)
            [resource_spans] = request.resource_spans
            attributes = resource_spans.resource.attributes
            attributes.add(key="openinference.project.name").value.string_value = project
            for span in resource_spans.scope_spans[0].spans:
                for attribute in span.attributes:
                    if attribute.key == "agent.name":
                        attribute.value.string_value = "closer"
            await producer.send_and_wait(
                topic,
                request.SerializeToString(),
                key=trace.trace_id_hex.encode(),
                partition=partition,
            )
    finally:
        await producer.stop()


def _truth_of(records: list[ConsumerRecord]) -> tuple[Truth, set[str]]:
    """Truth over whole traces: a trace may have reached Kafka in several messages."""
    by_trace: dict[bytes, ExportTraceServiceRequest] = {}
    span_ids: set[str] = set()
    for record in records:
        request = ExportTraceServiceRequest.FromString(record.value)
        merged = by_trace.setdefault(record.key, ExportTraceServiceRequest())
        merged.resource_spans.extend(request.resource_spans)
        span_ids.update(
            span.span_id.hex()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        )
    builder = TruthBuilder(WINDOW_MS)
    for request in by_trace.values():
        builder.add_request(request)
    return builder.build(), span_ids


def test_exporter_delivers_across_a_fork(stack: StackEndpoints, unique_name: str) -> None:
    """A process that forks (a pre-fork server, multiprocessing) publishes from both sides."""
    topic = f"{unique_name}.spans"
    asyncio.run(ensure_topic(bootstrap=stack.kafka_bootstrap, topic=topic, partitions=2))
    exporter = KafkaSpanExporter(bootstrap_servers=stack.kafka_bootstrap, topic=topic)
    try:
        assert exporter.export(_spans("parent-before", 3)) is SpanExportResult.SUCCESS
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            ok = exporter.export(_spans("child", 2)) is SpanExportResult.SUCCESS
            exporter.shutdown(timeout_millis=10_000)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert exporter.export(_spans("parent-after", 4)) is SpanExportResult.SUCCESS
        assert exporter.stats.exported_spans == 7
    finally:
        exporter.shutdown()
    records = asyncio.run(_read_all(stack.kafka_bootstrap, topic))
    names: list[str] = []
    for record in records:
        request = ExportTraceServiceRequest.FromString(record.value)
        names.extend(
            span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans
        )
    assert sorted(names) == sorted(
        [f"parent-before-{i}" for i in range(3)]
        + [f"child-{i}" for i in range(2)]
        + [f"parent-after-{i}" for i in range(4)]
    )


def _spans(prefix: str, count: int) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for index in range(count):
        with provider.get_tracer("test").start_as_current_span(f"{prefix}-{index}"):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


async def _read_all(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record of ``topic``, read until its end offsets."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = consumer.assignment()
        while not partitions:
            await asyncio.sleep(0.1)
            partitions = consumer.assignment()
        end = await consumer.end_offsets(list(partitions))
        records: list[ConsumerRecord] = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            batches = await consumer.getmany(timeout_ms=1_000)
            records.extend(record for batch in batches.values() for record in batch)
        return records
    finally:
        await consumer.stop()
