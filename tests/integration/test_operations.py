"""Operating a real worker: metrics under load, readiness through outages and restarts, status.

The worker is a real process on the real stack, found the way ops find it: through the worker
registry. MLflow is reached through a TCP relay the test can cut, which is how an MLflow
outage looks from the worker without stopping the MLflow the whole session shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from processor.loadgen import Scenario, TraceGenerator, Truth, publish_traces
from processor.stack import StackEndpoints
from processor.status import status_command
from processor.worker.observability import WorkerRegistry
from tests.integration.support import WorkerProcess, poll_until, worker_env

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _operations_env(stack: StackEndpoints, name: str, work_dir: Path, **extra: str) -> dict:
    return worker_env(
        stack,
        name=name,
        data_dir=work_dir / "faust",
        PROCESSOR_SPANS_PARTITIONS="2",
        PROCESSOR_PARTIALS_PARTITIONS="2",
        PROCESSOR_METRICS_HOST="127.0.0.1",
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_REGISTRY_DIR=str(work_dir / "registry"),
        PROCESSOR_HEALTH_CHECK_INTERVAL_S="1",
        **extra,
    )


def _registered_url(registry: WorkerRegistry, worker_id: str, worker: WorkerProcess) -> str:
    def note() -> str | None:
        assert worker.process is not None and worker.process.poll() is None, worker.log()[-3000:]
        return next((w.url for w in registry.workers() if w.worker_id == worker_id), None)

    return poll_until(note, timeout_s=60, interval_s=0.2, what=f"{worker_id} in the registry")


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def _readyz(base: str) -> tuple[int, list[str]] | None:
    response = _get(f"{base}/readyz")
    return None if response is None else (response.status_code, response.json()["problems"])


def _scrape(base: str) -> tuple[str, Samples]:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == f"trace_processor_{name}"
        and all((k, v) in sample_labels for k, v in labels.items())
    )


def _documented_families(text: str) -> set[str]:
    """Documented sample names whose family the exposition declares (TYPE lines)."""
    declared: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (trace_processor_\S+) (\S+)$", text, re.MULTILINE):
        declared |= {f"{name}_count", f"{name}_sum"} if kind == "summary" else {name}
        if kind == "info":
            declared.add(f"{name}_info")
    return declared


def test_metrics_move_under_loadgen_traffic_and_status_shows_the_worker(
    stack: StackEndpoints, unique_name: str, work_dir: Path
) -> None:
    # Event time well in the past, so every window closes once the worker is idle.
    start_ms = time.time_ns() // 1_000_000 - 15 * 60 * 1000
    traces = list(TraceGenerator(Scenario(agents=4, seed=5), start_ms=start_ms).generate(150))
    truth = Truth.from_traces(traces, window_size_ms=WINDOW_MS)
    spans = sum(trace.span_count for trace in traces)
    worker_id = f"{unique_name}-w1"
    env = _operations_env(
        stack,
        unique_name,
        work_dir,
        PROCESSOR_WORKER_ID=worker_id,
        PROCESSOR_LOG_FORMAT="json",
        PROCESSOR_WINDOW_SIZE_MS=str(WINDOW_MS),
        # Every span of a trace counts in its own window, as the truth has it.
        PROCESSOR_ALLOWED_LATENESS_MS=str(int(truth.max_trace_duration_ms) + 1_000),
        PROCESSOR_IDLE_TIMEOUT_MS="2000",
        # every span to Phoenix, so the forwarding counters can be checked span for span
        PROCESSOR_SAMPLING_PROBABILITY="1.0",
        # A webhook nobody answers: its counters are among the documented series.
        PROCESSOR_ALERT_WEBHOOK_URL="http://127.0.0.1:9/alerts",
    )
    registry = WorkerRegistry(work_dir / "registry")
    worker = WorkerProcess(env, work_dir / "worker.log").start()
    try:
        base = _registered_url(registry, worker_id, worker)
        poll_until(
            lambda: True if _readyz(base) == (200, []) else None,
            timeout_s=90,
            what="the worker to be ready",
        )
        text, before = _scrape(base)
        documented = set(re.findall(r"^\| `(trace_processor_\w+)`", DOCS.read_text(), re.M))
        assert documented <= _documented_families(text)
        assert _sum(before, "spans_in_total") == 0
        assert _sum(before, "assigned_partitions", topic=env["PROCESSOR_SPANS_TOPIC"]) == 2
        assert _sum(before, "dependency_up", dependency="phoenix") == 1
        assert _sum(before, "dependency_up", dependency="mlflow") == 1

        asyncio.run(
            publish_traces(
                traces, bootstrap=stack.kafka_bootstrap, topic=env["PROCESSOR_SPANS_TOPIC"]
            )
        )
        asyncio.run(_publish_raw(stack.kafka_bootstrap, env["PROCESSOR_SPANS_TOPIC"], b"\x0a\xff"))

        def all_written() -> Samples | None:
            _, samples = _scrape(base)
            done = _sum(samples, "windows_finalized_total") >= len(truth.rollups)
            accepted = _sum(samples, "phoenix_spans_accepted_total") >= spans
            return samples if done and accepted else None

        after = poll_until(all_written, timeout_s=150, what="every window written")
        assert _sum(after, "messages_consumed_total") == len(traces) + 1
        assert _sum(after, "spans_in_total") == spans
        partitions_used = {
            labels for (name, labels), v in after.items() if name.endswith("spans_in_total") and v
        }
        assert len(partitions_used) == 2, "traffic on both partitions, counted per partition"
        assert _sum(after, "dead_letters_total", reason="invalid_protobuf") == 1
        assert _sum(after, "spans_aggregated_total") == spans  # one worker, no replay
        assert _sum(after, "phoenix_spans_accepted_total") == spans
        assert _sum(after, "windows_finalized_total") == len(truth.rollups)
        assert _sum(after, "mlflow_windows_written_total") == len(truth.rollups)
        assert _sum(after, "windows_closed_total") >= len(
            {r["window_start_ms"] for r in truth.rollups}
        )
        assert _sum(after, "window_freshness_seconds_count") == len(truth.rollups)
        # The traffic is 15 minutes old: so is every window when it is written.
        assert _sum(after, "last_window_freshness_seconds") > 10 * 60
        assert _sum(after, "late_spans_total") == 0
        assert _sum(after, "trace_buffer_evicted_traces_total") == 0
        poll_until(
            lambda: (
                True
                if _sum(_scrape(base)[1], "consumer_lag", topic=env["PROCESSOR_SPANS_TOPIC"]) == 0
                else None
            ),
            timeout_s=30,
            what="no lag",
        )

        status = CliRunner().invoke(
            status_command,
            ["--registry-dir", str(work_dir / "registry"), "--once", "--interval", "0.5"],
            terminal_width=220,
        )
        assert status.exit_code == 0, status.output
        assert "1 worker(s), 1 ready" in status.output
        assert worker_id in status.output
        assert "invalid_protobuf" in status.output  # the dead letter, under errors
    finally:
        worker.stop()
    log = worker.log()
    assert "Traceback" not in log, log[-3000:]
    ours = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]
    assert ours and {entry["worker_id"] for entry in ours} == {worker_id}
    [letter] = [e for e in ours if e["message"].startswith("dead letter")]
    assert letter["partition"] in (0, 1) and letter["level"] == "warning"
    assert registry.workers() == []  # the note went with the worker


class TcpRelay:
    """Forwards 127.0.0.1:<port> to a target port until cut; can be restored on the same port."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(32)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed = [s for s in (self._listener, *self._sockets) if s is not None]
            self._listener = None
            self._sockets.clear()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def mlflow_relay(stack: StackEndpoints) -> Iterator[TcpRelay]:
    relay = TcpRelay(int(stack.mlflow_url.rsplit(":", 1)[1]))
    relay.start()
    yield relay
    relay.cut()


def test_readiness_follows_a_restart_and_an_mlflow_outage(
    stack: StackEndpoints, unique_name: str, work_dir: Path, mlflow_relay: TcpRelay
) -> None:
    env = _operations_env(
        stack, unique_name, work_dir, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_relay.port}"
    )
    registry = WorkerRegistry(work_dir / "registry")
    spans_topic, partials_topic = env["PROCESSOR_SPANS_TOPIC"], env["PROCESSOR_PARTIALS_TOPIC"]

    first = WorkerProcess({**env, "PROCESSOR_WORKER_ID": "first"}, work_dir / "first.log")
    first.start()
    try:
        base = _registered_url(registry, "first", first)
        poll_until(
            lambda: True if _readyz(base) == (200, []) else None,
            timeout_s=90,
            what="the first worker to be ready",
        )
        status = httpx.get(f"{base}/status", timeout=5).json()
        # One worker runs every role: the sampled topic's partitions are its forward role's.
        assert status["assignment"] == {
            spans_topic: [0, 1],
            partials_topic: [0, 1],
            env["PROCESSOR_SAMPLED_TOPIC"]: [0, 1, 2, 3],
        }
    finally:
        first.stop()
    assert registry.workers() == []
    assert _get(f"{base}/healthz") is None, "the first worker's server is gone"

    # MLflow unreachable while the worker restarts: it recovers its partitions, stays live,
    # and says exactly why it is not ready.
    mlflow_relay.cut()
    second = WorkerProcess({**env, "PROCESSOR_WORKER_ID": "second"}, work_dir / "second.log")
    second.start()
    try:
        base = _registered_url(registry, "second", second)
        seen: list[tuple[int, list[str]]] = []

        def recovered_but_mlflow_down() -> bool | None:
            answer = _readyz(base)
            if answer is not None:
                seen.append(answer)
            return True if answer is not None and _only_mlflow_down(answer[1]) else None

        poll_until(
            recovered_but_mlflow_down,
            timeout_s=90,
            interval_s=0.2,
            what="partitions restored with MLflow down",
        )
        assert all(code == 503 for code, _ in seen), seen
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        status = httpx.get(f"{base}/status", timeout=5).json()
        # One worker runs every role: the sampled topic's partitions are its forward role's.
        assert status["assignment"] == {
            spans_topic: [0, 1],
            partials_topic: [0, 1],
            env["PROCESSOR_SAMPLED_TOPIC"]: [0, 1, 2, 3],
        }
        time.sleep(3)  # several probe rounds: still not ready
        code, problems = _readyz(base) or (0, [])
        assert code == 503 and _only_mlflow_down(problems), problems

        mlflow_relay.start()  # MLflow is back, on the same address
        poll_until(
            lambda: True if _readyz(base) == (200, []) else None,
            timeout_s=30,
            what="ready once MLflow answers",
        )
        _, samples = _scrape(base)
        assert _sum(samples, "ready") == 1
        assert _sum(samples, "dependency_up", dependency="mlflow") == 1
    finally:
        second.stop()
    for worker in (first, second):
        assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _only_mlflow_down(problems: list[str]) -> bool:
    """Every partition restored, Phoenix fine: MLflow is the one reason not to be ready."""
    return len(problems) == 1 and problems[0].startswith("mlflow: unreachable")


async def _publish_raw(bootstrap: str, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"not-otlp")
    finally:
        await producer.stop()
