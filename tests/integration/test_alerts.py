"""Alerts on the real stack: one agent's error rate over 5 % for three windows, another agent
falling silent, a third healthy; the worker killed with SIGKILL mid-incident; the alerts topic,
a real webhook server (down for a while), the Prometheus gauge and the MLflow tags."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from mlflow.tracking import MlflowClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from processor.loadgen import publish_traces
from processor.stack import StackEndpoints
from tests.integration.support import WorkerProcess, poll_until, worker_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = orjson.loads((ROOT / "schemas" / "alert.schema.json").read_bytes())
WINDOW_MS = 10_000
SPANS_PER_WINDOW = 30
WINDOWS = 10
# flaky fails 20 % of its spans in windows 3, 4 and 5; quiet sends nothing in 5, 6 and 7.
FAILING = {3, 4, 5}
QUIET = {5, 6, 7}
RULES = """\
rules:
  - name: error-rate
    metric: error_rate
    op: ">"
    threshold: 0.05
    for: 2
    min_spans: 20
  - name: quiet-silent
    kind: silent
    windows: 3
    agent: quiet
    severity: critical
"""


@dataclass(frozen=True)
class Trace:
    """One single-span trace of one agent, as the publisher takes it."""

    trace_id_hex: str
    payload: bytes
    span_count: int = 1
    error_count: int = 0


def _trace(n: int, agent: str, end_ms: int, failed: bool) -> Trace:
    trace_id = (0xA1E27 << 80 | n).to_bytes(16, "big")
    span = Span(
        trace_id=trace_id,
        span_id=(n + 1).to_bytes(8, "big"),
        name=f"{agent}.invoke",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=(end_ms - 200) * 1_000_000,
        end_time_unix_nano=end_ms * 1_000_000,
        attributes=[KeyValue(key="agent.name", value=AnyValue(string_value=agent))],
        status=Status(code=Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_OK),
    )
    resource = Resource(
        attributes=[KeyValue(key="service.name", value=AnyValue(string_value="alerting-app"))]
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=[span])])]
    )
    return Trace(trace_id.hex(), request.SerializeToString(), error_count=int(failed))


def _traffic(start_ms: int) -> list[tuple[int, Trace]]:
    """(window, trace) in event-time order."""
    traffic = []
    n = 0
    for window in range(WINDOWS):
        for i in range(SPANS_PER_WINDOW):
            end_ms = start_ms + window * WINDOW_MS + 100 + i * (WINDOW_MS - 200) // SPANS_PER_WINDOW
            for agent in ("flaky", "quiet", "steady"):
                if agent == "quiet" and window in QUIET:
                    continue
                failed = agent == "flaky" and window in FAILING and i % 5 == 0  # 20 %
                traffic.append((window, _trace(n, agent, end_ms, failed)))
                n += 1
    return traffic


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _alerts(bootstrap: str, topic: str) -> list[tuple[bytes, dict[str, Any]]]:
    async def read() -> list[tuple[bytes, dict[str, Any]]]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        try:
            found = []
            batches = await consumer.getmany(timeout_ms=2000)
            while batches:
                for records in batches.values():
                    found += [(r.key, orjson.loads(r.value)) for r in records]
                batches = await consumer.getmany(timeout_ms=1000)
            return found
        finally:
            await consumer.stop()

    return asyncio.run(read())


def _firing_gauge(metrics_url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    text = httpx.get(metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "trace_processor_alert_firing":
            for sample in family.samples:
                found[(sample.labels["rule"], sample.labels["agent"])] = sample.value
    return found


def test_alerts_fire_and_resolve_once_per_incident_through_a_sigkill(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    # Event time in the past, whole windows.
    start_ms = (time.time_ns() // 1_000_000 - 30 * 60 * 1000) // WINDOW_MS * WINDOW_MS
    traffic = _traffic(start_ms)
    rules = work_dir / "rules.yaml"
    rules.write_text(RULES)
    hook_port = free_port()
    metrics_port = free_port()
    env = worker_env(
        stack,
        name=unique_name,
        data_dir=work_dir / "faust",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        PROCESSOR_ALLOWED_LATENESS_MS="1000",
        PROCESSOR_SPANS_PARTITIONS="2",
        # No idle advance before the kill: the wall clock would close every window at once.
        PROCESSOR_IDLE_TIMEOUT_MS=str(3600 * 1000),
        PROCESSOR_SAMPLING_PROBABILITY="0.0",
        PROCESSOR_ALERT_RULES_FILE=str(rules),
        # Nothing listens there yet: the webhook is down until after the restart.
        PROCESSOR_ALERT_WEBHOOK_URL=f"http://127.0.0.1:{hook_port}/alerts",
        PROCESSOR_METRICS_PORT=str(metrics_port),
    )
    topic, alerts_topic = env["PROCESSOR_SPANS_TOPIC"], env["PROCESSOR_ALERTS_TOPIC"]
    # The first part: up to window 5 of steady, so that window 4 closes (flaky fires there).
    first = [trace for window, trace in traffic if window <= 4] + [
        trace for window, trace in traffic if window == 5 and "steady" in _agent_of(trace)
    ]
    rest = [trace for _, trace in traffic if trace not in set(first)]
    asyncio.run(publish_traces(first, bootstrap=stack.kafka_bootstrap, topic=topic, partitions=2))
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    server: ThreadingHTTPServer | None = None
    try:
        poll_until(
            lambda: [a for _, a in _alerts(stack.kafka_bootstrap, alerts_topic)] or None,
            timeout_s=180,
            what="the first alert",
        )
        time.sleep(3)  # a commit: the restart goes on from the saved alert states
        before_kill_gauge = _firing_gauge(f"http://127.0.0.1:{metrics_port}/metrics")
        worker.kill()
        before_kill = _alerts(stack.kafka_bootstrap, alerts_topic)
        assert [(a["agent"], a["state"]) for _, a in before_kill] == [("flaky", "firing")]

        asyncio.run(
            publish_traces(rest, bootstrap=stack.kafka_bootstrap, topic=topic, partitions=2)
        )
        worker = WorkerProcess(
            {**env, "PROCESSOR_IDLE_TIMEOUT_MS": "2000"}, work_dir / "worker.log"
        ).start()

        def incidents_over() -> list | None:
            found = _alerts(stack.kafka_bootstrap, alerts_topic)
            states = {(a["rule"], a["agent"], a["state"]) for _, a in found}
            wanted = {
                ("error-rate", "flaky", "firing"),
                ("error-rate", "flaky", "resolved"),
                ("quiet-silent", "quiet", "firing"),
                ("quiet-silent", "quiet", "resolved"),
            }
            return found if wanted <= states else None

        found = poll_until(incidents_over, timeout_s=180, what="both incidents in the topic")
        gauge = _firing_gauge(f"http://127.0.0.1:{metrics_port}/metrics")
        # The webhook was down all along: it comes up now and gets every event.
        Webhook.received = []
        server = ThreadingHTTPServer(("127.0.0.1", hook_port), Webhook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        received = poll_until(
            lambda: Webhook.received if len(Webhook.received) >= 4 else None,
            timeout_s=120,
            what="the webhook calls",
        )
    finally:
        worker.stop()
        if server is not None:
            server.shutdown()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]

    # One event per (rule, series, window); a copy after the crash would carry the same key
    # and the same content.
    by_key: dict[bytes, dict[str, Any]] = {}
    for key, alert in found:
        jsonschema.validate(alert, SCHEMA)
        assert by_key.setdefault(key, alert) == alert
    events = sorted(
        (a["rule"], a["agent"], a["state"], (a["window_start_ms"] - start_ms) // WINDOW_MS)
        for a in by_key.values()
    )
    assert events == [
        ("error-rate", "flaky", "firing", 4),  # the second window over 5 %
        ("error-rate", "flaky", "resolved", 6),  # the first one under it
        ("quiet-silent", "quiet", "firing", 5),  # the first window without its spans
        ("quiet-silent", "quiet", "resolved", 8),  # back
    ]
    fired = next(a for a in by_key.values() if a["agent"] == "flaky" and a["state"] == "firing")
    assert fired["value"] == pytest.approx(0.2) and fired["threshold"] == 0.05
    assert fired["window_end_ms"] - fired["window_start_ms"] == WINDOW_MS
    assert fired["exemplars"] and all(
        e["phoenix_url"].endswith(e["trace_id"]) for e in fired["exemplars"]
    )
    # Prometheus: nothing fires any more (it did before the kill, see below).
    assert gauge == {}
    assert before_kill_gauge == {("error-rate", "flaky"): 1.0}
    # The webhook got every event, the one from before the kill too (it reads the topic, and
    # commits only what it delivered), in order; a copy would have the same key and content.
    delivered: dict[str, dict[str, Any]] = {}
    for body in received:
        jsonschema.validate(body, SCHEMA)
        assert delivered.setdefault(body["key"], body) == body
    assert {key.decode() for key in by_key} == set(delivered)
    firing_first = [r["state"] for r in received if r["agent"] == "flaky"]
    assert firing_first[0] == "firing" and firing_first[-1] == "resolved"
    # MLflow: the day's run of each series says the state of the last change.
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    experiment = client.get_experiment_by_name(unique_name)
    assert experiment is not None
    tags: dict[str, dict[str, str]] = defaultdict(dict)
    for run in client.search_runs([experiment.experiment_id]):
        for name, value in run.data.tags.items():
            if name.startswith("alert."):
                tags[run.data.tags["agent"]][name] = value
    assert tags["flaky"]["alert.error-rate"].startswith("resolved at ")
    assert tags["quiet"]["alert.quiet-silent"].startswith("resolved at ")
    assert "steady" not in tags
    run_ids = {a["mlflow_run_id"] for a in by_key.values()}
    assert None not in run_ids


def _agent_of(trace: Trace) -> str:
    request = ExportTraceServiceRequest.FromString(trace.payload)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    return span.attributes[0].value.string_value


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ("rules:\n  - name: x\n    metric: error_rate\n    op: =>\n    threshold: 1\n", "op"),
        ("rules:\n  - name: x\n    metric: error_rate\n    op: '>'\n  threshold: [\n", "line"),
        ("rules:\n  - name: x\n    metric: eror_rate\n    op: '>'\n    threshold: 1\n", "eror"),
    ],
)
def test_a_malformed_rules_file_stops_start_up_saying_what_to_fix(
    stack: StackEndpoints, unique_name: str, work_dir: Path, rules: str, says: str
) -> None:
    path = work_dir / "rules.yaml"
    path.write_text(rules)
    env = worker_env(
        stack, name=unique_name, data_dir=work_dir / "faust", PROCESSOR_ALERT_RULES_FILE=str(path)
    )
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    assert worker.process is not None
    assert worker.process.wait(timeout=60) != 0
    log = worker.log()
    assert str(path) in log and says in log, log[-2000:]
    assert "PROCESSOR_ALERT_RULES_FILE" in log or "alert rules file" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
