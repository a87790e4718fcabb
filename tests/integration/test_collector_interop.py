"""Spans that come through an OpenTelemetry Collector's Kafka exporter reach the right rollups.

What the Collector writes (exporter/kafkaexporter in opentelemetry-collector-contrib):

- ``encoding: otlp_proto`` (the default) or ``otlp_json``: a whole ``ExportTraceServiceRequest``,
  marshalled by pdata; OTLP/JSON as pdata writes it (hex trace and span ids, 64-bit integers as
  strings, enums as numbers, default values left out).
- no ``content-type`` header (headers only from ``include_metadata_keys``/``record_headers``);
- ``partition_traces_by_id: true``: the batch is split per trace (``batchpersignal.SplitTraces``)
  and each message is keyed by the trace id in lowercase hex;
- ``partition_traces_by_id: false`` (the default): one message per batch, key nil, so the batch
  holds many traces and the partitioner (sticky / round robin) spreads batches over partitions.

The messages are built here the same way and published to the real broker; a real worker reads
them, and MLflow must hold exactly the loadgen's independent truth. Unkeyed batches that split
a trace over partitions are read with ``PROCESSOR_REPARTITION_BY_TRACE_ID``: the repartition rekeys
every trace through the repartition topic before trace assembly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from processor.core.repartition import split_by_trace
from processor.loadgen import GeneratedTrace, Scenario, TraceGenerator, Truth, TruthBuilder
from processor.loadgen import ensure_topic as create_topic
from processor.stack import StackEndpoints
from tests.integration.support import WorkerProcess, mlflow_rollups, poll_until, worker_env

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
PARTITIONS = 4
TRACES_PER_ENCODING = 30
BATCH_TRACES = 6  # traces per Collector batch when not partitioned by trace id
EXACT = ("spans", "errors", "invocations", "llm_calls", "tokens_prompt", "tokens_completion",
         "tokens_total", "late_spans")  # fmt: skip
PERCENTILES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
CLOSER = "closer"

# (key, value, partition): partition None lets the producer's partitioner choose.
Record = tuple[bytes | None, bytes, int | None]
Encoder = Callable[[ExportTraceServiceRequest], bytes]
Shape = Callable[
    [list[GeneratedTrace], str, Encoder], tuple[list[Record], list[ExportTraceServiceRequest]]
]


def otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON the way the Collector's pdata marshaller writes it."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _ids_to_hex(span, ("traceId", "spanId", "parentSpanId"))
                for link in span.get("links", ()):
                    _ids_to_hex(link, ("traceId", "spanId"))
    return orjson.dumps(document)


def _ids_to_hex(obj: dict, names: Iterable[str]) -> None:
    for name in names:
        if name in obj:
            obj[name] = base64.b64decode(obj[name]).hex()


def relabelled(trace: GeneratedTrace, prefix: str) -> ExportTraceServiceRequest:
    """The trace with agents and service renamed ``prefix/...``: each encoding's numbers land in
    series of their own, so a failure names the encoding that broke."""
    request = ExportTraceServiceRequest()
    request.CopyFrom(trace.request)
    for resource_spans in request.resource_spans:
        for attribute in resource_spans.resource.attributes:
            if attribute.key == "service.name":
                attribute.value.string_value = f"{prefix}/{attribute.value.string_value}"
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                for attribute in span.attributes:
                    if attribute.key == "agent.name":
                        attribute.value.string_value = f"{prefix}/{attribute.value.string_value}"
    return request


def batched(requests: list[ExportTraceServiceRequest]) -> ExportTraceServiceRequest:
    """One Collector batch: the batch processor appends each request's ResourceSpans."""
    batch = ExportTraceServiceRequest()
    for request in requests:
        batch.resource_spans.extend(request.resource_spans)
    return batch


def _traffic(count: int, seed: int, start_ms: int) -> list[GeneratedTrace]:
    scenario = Scenario(agents=4, seed=seed, latency_scale=0.1)
    return list(TraceGenerator(scenario, start_ms=start_ms, rate=2.0).generate(count))


def keyed_per_trace(
    traces: list[GeneratedTrace], prefix: str, encode: Encoder
) -> tuple[list[Record], list[ExportTraceServiceRequest]]:
    """``partition_traces_by_id: true``."""
    requests = [relabelled(trace, prefix) for trace in traces]
    records: list[Record] = [
        (trace.trace_id_hex.encode("ascii"), encode(request), None)
        for trace, request in zip(traces, requests, strict=True)
    ]
    return records, requests


def unkeyed_batches(
    traces: list[GeneratedTrace], prefix: str, encode: Encoder
) -> tuple[list[Record], list[ExportTraceServiceRequest]]:
    """``partition_traces_by_id: false``, each trace whole inside one batch."""
    requests = [relabelled(trace, prefix) for trace in traces]
    records: list[Record] = []
    for first in range(0, len(requests), BATCH_TRACES):
        batch = batched(requests[first : first + BATCH_TRACES])
        # Round robin over partitions, as the Collector's partitioner spreads nil-key batches.
        records.append((None, encode(batch), (first // BATCH_TRACES) % PARTITIONS))
    return records, requests


@dataclass
class Run:
    """One worker reading one topic of Collector messages, and the truth of that topic."""

    name: str
    truth: Truth
    worker: WorkerProcess


@pytest.fixture(scope="module")
def runs(
    stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Run]]:
    """Both scenarios' workers, started together: a worker takes a while to start."""
    start_ms = time.time_ns() // 1_000_000 - 20 * 60 * 1000
    scenarios = {
        "encodings": _encodings_scenario(start_ms),
        "split": _split_scenario(start_ms),
    }
    # Batches that split traces over partitions need the repartition by trace id.
    repartition = {"encodings": False, "split": True}
    started: dict[str, Run] = {}
    try:
        for key, (records, truth) in scenarios.items():
            name = f"collector-{key}-{os.getpid()}-{time.time_ns() % 10**6}"
            work_dir = tmp_path_factory.mktemp(f"collector-{key}")
            env = worker_env(
                stack,
                name=name,
                data_dir=work_dir / "faust",
                PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
                PROCESSOR_ALLOWED_LATENESS_MS=str(_lateness_ms(truth, repartition[key])),
                PROCESSOR_IDLE_TIMEOUT_MS="60000",  # windows close on the closers' data
                PROCESSOR_PHOENIX_ENABLED="false",
                PROCESSOR_REPARTITION_BY_TRACE_ID=str(repartition[key]).lower(),
                PROCESSOR_PROGRESS_LOG_INTERVAL_S="1",
            )
            closers = _closers(start_ms + 10 * 60 * 1000, by_key=repartition[key])
            topic = env["PROCESSOR_SPANS_TOPIC"]
            if not repartition[key]:
                asyncio.run(_publish(stack.kafka_bootstrap, topic, records + closers))
                started[key] = Run(name, truth, WorkerProcess(env, work_dir / "worker.log").start())
                continue
            # The repartition interleaves the source partitions as it rekeys them: closers published
            # with the traffic could reach a repartition partition before some of its traffic
            # and make that traffic late. So they follow once aggregate has handled the traffic.
            asyncio.run(_publish(stack.kafka_bootstrap, topic, records))
            worker = WorkerProcess(env, work_dir / "worker.log").start()
            started[key] = Run(name=name, truth=truth, worker=worker)
            pieces = sum(
                len(split_by_trace(ExportTraceServiceRequest.FromString(value)))
                for _, value, _ in records
            )
            _wait_for_handled(worker, pieces)
            asyncio.run(_publish(stack.kafka_bootstrap, topic, closers))
        yield started
    finally:
        for run in started.values():
            run.worker.stop()


def _lateness_ms(truth: Truth, repartitioned: bool) -> int:
    """A trace's duration, plus, when repartitioning, the traffic's whole event-time span.

    The repartition may rekey one source partition's backlog before another's: a repartition
    partition then sees event time run ahead by up to the span of the traffic, and the
    allowed lateness has to cover that skew (as the README says)."""
    lateness = int(truth.max_trace_duration_ms) + 1_000
    if repartitioned:
        starts = [r["window_start_ms"] for r in truth.rollups]
        ends = [r["window_end_ms"] for r in truth.rollups]
        lateness += max(ends) - min(starts)
    return lateness


def _closers(end_ms: int, *, by_key: bool) -> list[Record]:
    """A trace on each partition, well after the test's traffic, of an agent of its own: every
    partition's watermark passes the traffic's windows, which close on data rather than on the
    idle timeout (which the worker starts counting before it has handled a partition's first
    messages). With ``by_key`` the closers are chosen so that their trace-id keys hash to every
    partition, as the repartition by trace id will place them."""
    scenario = Scenario(agents=1, trace_size=4, seed=999, latency_scale=0.05, service_name=CLOSER)
    generator = TraceGenerator(scenario, start_ms=end_ms, rate=5.0)
    records: list[Record] = []
    covered: set[int] = set()
    index = 0
    while len(covered) < PARTITIONS:
        trace = generator.trace(index, end_ns=generator.end_ns_of(index))
        key = trace.trace_id_hex.encode()
        partition = DefaultPartitioner()(key, list(range(PARTITIONS)), []) if by_key else index
        index += 1
        if partition in covered:
            continue
        covered.add(partition)
        request = relabelled(trace, CLOSER)
        records.append((key, request.SerializeToString(), partition))
    return records


def _encodings_scenario(start_ms: int) -> tuple[list[Record], Truth]:
    """Both encodings, with and without ``partition_traces_by_id``; each trace whole."""
    encodings: list[tuple[str, Shape, Encoder]] = [
        ("proto-by-trace-id", keyed_per_trace, ExportTraceServiceRequest.SerializeToString),
        ("json-by-trace-id", keyed_per_trace, otlp_json),
        ("proto-batches", unkeyed_batches, ExportTraceServiceRequest.SerializeToString),
        ("json-batches", unkeyed_batches, otlp_json),
    ]
    records: list[Record] = []
    truth = TruthBuilder(WINDOW_MS)
    for seed, (prefix, shape, encode) in enumerate(encodings):
        # One stretch of event time after the other, published in that order: an encoding's
        # traces must not arrive behind the next one's, as late spans.
        begin_ms = start_ms + seed * (TRACES_PER_ENCODING // 2 + 5) * 1000
        traces = _traffic(TRACES_PER_ENCODING, seed=100 + seed, start_ms=begin_ms)
        shaped, requests = shape(traces, prefix, encode)
        records.extend(shaped)
        for request in requests:
            truth.add_request(request)
    return records, truth.build()


def _split_scenario(start_ms: int) -> tuple[list[Record], Truth]:
    """No ``partition_traces_by_id``, and traces that reached the Collector in two SDK exports
    (children first, the rest when the root ended), so each lands in a different batch."""
    traces = _traffic(TRACES_PER_ENCODING, seed=7, start_ms=start_ms)
    requests = [relabelled(trace, "split") for trace in traces]
    truth = TruthBuilder(WINDOW_MS)
    for request in requests:
        truth.add_request(request)
    records: list[Record] = []
    for first in range(0, len(requests), BATCH_TRACES):
        early, late = zip(
            *(_halves(r) for r in requests[first : first + BATCH_TRACES]), strict=True
        )
        partition = (first // BATCH_TRACES) % PARTITIONS
        records.append((None, batched(list(early)).SerializeToString(), partition))
        records.append(
            (None, batched(list(late)).SerializeToString(), (partition + 1) % PARTITIONS)
        )
    return records, truth.build()


def test_collector_messages_in_both_encodings_with_and_without_trace_keys(
    stack: StackEndpoints, runs: dict[str, Run]
) -> None:
    _assert_rollups_equal_truth(stack, runs["encodings"])


def test_collector_batches_that_split_traces_over_partitions(
    stack: StackEndpoints, runs: dict[str, Run]
) -> None:
    _assert_rollups_equal_truth(stack, runs["split"])


def _halves(request: ExportTraceServiceRequest) -> tuple[ExportTraceServiceRequest, ...]:
    """The first half of a trace's spans in end order (an SDK exports spans as they end), and
    the rest, root included."""
    [resource_spans] = request.resource_spans
    [scope_spans] = resource_spans.scope_spans
    spans = list(scope_spans.spans)
    parts = []
    for part in (spans[: len(spans) // 2], spans[len(spans) // 2 :]):
        piece = ExportTraceServiceRequest()
        copy = piece.resource_spans.add()
        copy.resource.CopyFrom(resource_spans.resource)
        scope = copy.scope_spans.add()
        scope.scope.CopyFrom(scope_spans.scope)
        scope.spans.extend(part)
        parts.append(piece)
    return tuple(parts)


def _assert_rollups_equal_truth(stack: StackEndpoints, run: Run) -> None:
    expected: dict[tuple[str, int], dict[str, Any]] = {
        (r["agent"], r["window_start_ms"] // WINDOW_MS): dict(r) for r in run.truth.rollups
    }

    def all_windows_written() -> dict | None:
        found = mlflow_rollups(stack.mlflow_url, run.name)
        done = all(set(EXACT) <= set(found.get(key, ())) for key in expected)
        return found if done else None

    def rollups() -> dict[tuple[str, int], dict[str, float]]:
        found = mlflow_rollups(stack.mlflow_url, run.name)
        return {key: value for key, value in found.items() if not key[0].startswith(CLOSER)}

    with contextlib.suppress(AssertionError):  # below says which windows differ or lack
        poll_until(all_windows_written, timeout_s=240, what="every window in MLflow")
    # Let a window that should not exist (spans under a wrong agent) be written too.
    time.sleep(3)
    found = rollups()
    wrong = {
        key: {
            metric: (found.get(key, {}).get(metric), want.get(metric, 0))
            for metric in EXACT
            if found.get(key, {}).get(metric) != want.get(metric, 0)
        }
        for key, want in expected.items()
    }
    wrong = {key: diff for key, diff in wrong.items() if diff}
    extra = {key: found[key] for key in set(found) - set(expected)}
    assert not wrong and not extra, f"(got, want) per window: {wrong}; unexpected: {extra}"
    for key, want in expected.items():
        if want["invocations"]:
            for metric in PERCENTILES:
                assert found[key][metric] == pytest.approx(want[metric], rel=0.01), key
    log = run.worker.log()
    assert "Traceback" not in log, log[-3000:]


def _wait_for_handled(worker: WorkerProcess, count: int) -> None:
    """Until aggregate has handled ``count`` messages, by the worker's progress line."""

    def handled() -> int | None:
        found = re.findall(r"progress messages=(\d+)", worker.log())
        return 1 if found and int(found[-1]) >= count else None

    poll_until(handled, timeout_s=120, what=f"{count} messages handled by aggregate")


async def _publish(bootstrap: str, topic: str, records: list[Record]) -> None:
    await create_topic(bootstrap=bootstrap, topic=topic, partitions=PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, max_request_size=8 << 20
    )
    await producer.start()
    try:
        deliveries = [
            await producer.send(topic, value=value, key=key, partition=partition)
            for key, value, partition in records
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
