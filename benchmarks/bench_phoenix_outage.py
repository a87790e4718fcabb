"""Phoenix stopped mid-stream, with the roles split over two workers: what lags and what arrives.

    .venv/bin/python benchmarks/bench_phoenix_outage.py [--warmup-s 60] [--outage-s 300]

The issue's target: Phoenix stopped for 5 minutes mid-stream, every window's rollup reaches
MLflow within window end + allowed lateness + 5 s throughout; when Phoenix returns, every
kept span is in Phoenix exactly once; nothing is lost when a forwarding worker is killed with
SIGKILL while Phoenix is down. This prints the numbers for it; it asserts nothing.

Starts (or reuses) a local stack under ``.stack-outage/`` on its own ports, fresh topic names
per run, and two workers: ``--roles aggregate,finalize`` and ``--roles forward``. A real-time
``trace-processor loadgen`` stream (``--rate`` traces/s of ~20 spans, 10 s windows, the default
5 s allowed lateness, 10% sampling plus every trace with an error) runs through this timeline,
in seconds from the first trace:

    0 .. warmup                Phoenix up
    warmup                     Phoenix stopped (SIGTERM to its process group)
    warmup + outage/2          the forward worker killed with SIGKILL and started again
    warmup + outage            Phoenix started again (same data folder and port)
    warmup + outage + after    traffic stops; then wait for every window and for forward lag 0

Each window's delay is when the finalize worker logged ``wrote window <start> of <agent>``
minus the window's end, by phase of the window's end: before the outage, during it, after
Phoenix answered again, and the tail (windows ending after the traffic stopped, which only
the idle timeout closes). A window is over target when its delay exceeds the allowed lateness
+ 5 s. Next to it the table shows the window's *floor*, the earliest the rules let it be
written: a window stays open while a span counted in it waits for its trace's sampling
decision, due when the watermark (the newest end time - the lateness) reaches the root's end
+ the decision grace; so the floor is that due time + the lateness - the window's end (read
back from the spans topic), and delay - floor is what the workers and MLflow took on top.

Then it prints the kept spans in the sampled topic against Phoenix's spans of the project
(distinct, duplicates, missing), the forward lag gauge per phase, the time from Phoenix's
return to forward lag 0, the workers' peak RSS (VmHWM) and how many MLflow windows equal
loadgen's truth.

Traces are published whole when their root ends (one message per trace), so a span reaches
Kafka as much as its trace's duration after its end time: with ``--latency-scale 1`` (traces of
~20 s median) most spans would arrive after their window closed and count as late, which
says nothing about Phoenix. The default 0.1 gives traces of ~2 s (p95 ~6 s); the spans a
longer trace brings late are counted in ``late_spans``, which the MLflow line shows. The
first traces' children date back before the traffic started, to partitions whose watermark
followed the clock while idle: a window that ended before then holds only such late spans, so
it is never written as its own and the comparison leaves it out (its spans count as late).

The workers run from a venv of their own (``.stack-outage/worker-venv``) with only the
worker's runtime dependencies, as deployed; ``--dev-venv`` runs them from this interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

# The script's folder is on sys.path: the workers' venv is made as bench_worker makes it.
from bench_worker import _worker_venv
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from processor.core.rollup import ALL_AGENTS
from processor.loadgen import Truth
from processor.settings import StackSettings, WorkerSettings
from processor.stack import LocalStack, StackEndpoints
from processor.worker.kept_spans import spans_of_record

WINDOW_MS = 10_000
# Compared exactly against loadgen's truth.
EXACT = ("spans", "errors", "tokens_prompt", "tokens_completion", "tokens_total")
MLFLOW_METRICS = (*EXACT, "late_spans", "sampled_spans")
# Phoenix is stopped and started again on its port. Below Linux's ephemeral range
# (32768-60999): a client retrying to connect to a port in that range while nothing listens
# can be handed that very port as its own source port, connect to itself and keep the
# restarted Phoenix from binding it (see tests/integration/test_phoenix_forwarding.py).
PHOENIX_PORT = 28006
PHOENIX_GRPC_PORT = 28317
METRICS_AT = re.compile(r"metrics and health at (\S+)")
WROTE_WINDOW = re.compile(r"^wrote window (\d+) of (.+?): ")
console = Console(width=150)
T = TypeVar("T")


@dataclass
class Worker:
    """One `trace-processor worker` process, its JSON log and its peak RSS."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    peak_rss_kib: int = 0
    _url: str | None = None

    def start(self) -> Worker:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def entries(self) -> Iterator[dict[str, Any]]:
        """The log's JSON records (lines that are not JSON, e.g. a crash's output, skipped)."""
        if not self.log_path.exists():
            return
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue

    @property
    def url(self) -> str | None:
        """The base URL of its /metrics, from its log line once it is serving."""
        if self._url is None:
            for entry in self.entries():
                found = METRICS_AT.search(entry.get("message", ""))
                if found:
                    self._url = found.group(1)
                    break
        return self._url

    def note_rss(self) -> None:
        if self.process is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, _vm_hwm_kib(self.process.pid))

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.note_rss()
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 60) -> None:
        if not self.alive:
            return
        assert self.process is not None
        self.note_rss()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass
class Monitor:
    """Samples, once a second, the forward lag and every worker's peak RSS, in a thread."""

    workers: list[Worker]
    lag: list[tuple[float, int | None]] = field(default_factory=list)  # (wall time, records)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def forwarder(self) -> Worker | None:
        live = [w for w in self.workers if w.name.startswith("forward") and w.alive]
        return live[-1] if live else None

    def _run(self) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not self._stop.wait(1.0):
                for worker in list(self.workers):
                    if worker.alive:
                        worker.note_rss()
                forwarder = self.forwarder()
                url = forwarder.url if forwarder is not None else None
                self.lag.append((time.time(), _forward_lag(client, url)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="traces per second")
    parser.add_argument("--trace-size", type=int, default=20, help="mean spans per trace")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--latency-scale", type=float, default=0.1, help="see the docstring")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="traffic before the outage")
    parser.add_argument("--outage-s", type=float, default=300.0, help="how long Phoenix is away")
    parser.add_argument(
        "--after-s",
        type=float,
        default=120.0,
        help="traffic after Phoenix is started again, its start-up included (which took "
        "60-110 s on a busy 2-core machine)",
    )
    parser.add_argument(
        "--lateness-ms", type=int, default=5_000, help="the workers' allowed lateness"
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--keep-errors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every trace with an error (the default policy); with --no-keep-errors only "
        "the 10%% probability keeps a trace, so it is decided on its first span and no window "
        "waits for a decision",
    )
    parser.add_argument(
        "--catch-up-timeout-s",
        type=float,
        default=3600.0,
        help="longest wait for forward lag 0 once the traffic stopped",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run the workers from this interpreter instead of a venv holding only the "
        "worker's own dependencies, as deployed",
    )
    args = parser.parse_args()

    state = Path(".stack-outage").resolve()
    state.mkdir(exist_ok=True)
    python = sys.executable if args.dev_venv else _worker_venv(state / "worker-venv")
    stack = LocalStack(
        StackSettings(
            dir=state,
            kafka_port=48092,
            kafka_controller_port=48093,
            phoenix_port=PHOENIX_PORT,
            phoenix_grpc_port=PHOENIX_GRPC_PORT,
            mlflow_port=48500,
            start_timeout_s=600,
        ),
        console=console,
    )
    workers: list[Worker] = []
    loadgen: subprocess.Popen[bytes] | None = None
    monitor = Monitor(workers)
    try:
        endpoints = stack.up()
        name = f"outage-{time.strftime('%H%M%S')}"
        run_dir = state / "runs" / name
        run_dir.mkdir(parents=True)
        env = _worker_env(endpoints, name, state, args)
        console.print(f"run {name}: workers with {python}, logs in {run_dir}")

        def worker(role_name: str, roles: str) -> Worker:
            started = Worker(
                role_name,
                [python, "-m", "processor.cli", "worker", "--roles", roles],
                {**env, "PROCESSOR_WORKER_ID": f"{name}-{role_name}"},
                run_dir / f"{role_name}.log",
            ).start()
            workers.append(started)
            return started

        aggregating = worker("aggregate", "aggregate,finalize")
        _wait_for(lambda: _logged(aggregating, "worker up"), 300, "the aggregate worker", workers)
        forwarder = worker("forward-1", "forward")
        _wait_for(lambda: forwarder.url, 300, "the forward worker", workers)
        monitor.start()

        truth_path = run_dir / "truth.json"
        traffic_s = args.warmup_s + args.outage_s + args.after_s
        with (run_dir / "loadgen.log").open("ab") as loadgen_log:
            loadgen = subprocess.Popen(
                [
                    sys.executable, "-m", "processor.cli", "loadgen",
                    "--bootstrap", endpoints.kafka_bootstrap,
                    "--topic", env["PROCESSOR_SPANS_TOPIC"],
                    "--partitions", str(args.partitions),
                    "--rate", str(args.rate),
                    "--duration", str(traffic_s),
                    "--agents", str(args.agents),
                    "--trace-size", str(args.trace_size),
                    "--latency-scale", str(args.latency_scale),
                    "--window-size-ms", str(WINDOW_MS),
                    "--truth", str(truth_path),
                    "--no-progress",
                ],
                stdout=loadgen_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        traffic_from = time.time()
        timeline: dict[str, float] = {"traffic started": traffic_from}

        _sleep_until(traffic_from + args.warmup_s, workers)
        timeline["Phoenix stop requested"] = time.time()
        stack.stop("phoenix")
        timeline["Phoenix stopped"] = time.time()

        _sleep_until(traffic_from + args.warmup_s + args.outage_s / 2, workers)
        forwarder.kill()
        timeline["forward worker killed (SIGKILL)"] = time.time()
        forwarder = worker("forward-2", "forward")
        _wait_for(lambda: forwarder.url, 300, "the restarted forward worker", workers)
        timeline["forward worker serving again"] = time.time()

        _sleep_until(traffic_from + args.warmup_s + args.outage_s, workers)
        timeline["Phoenix start requested"] = time.time()
        stack.start("phoenix")
        phoenix_back = timeline["Phoenix answering again"] = time.time()

        while loadgen.poll() is None:
            _check_alive(workers)
            time.sleep(1)
        traffic_until = timeline["traffic stopped"] = time.time()
        if loadgen.returncode != 0:
            raise SystemExit(f"loadgen failed ({loadgen.returncode}); see {run_dir}/loadgen.log")
        truth = Truth.load(truth_path)
        before_traffic = _ended_before(truth, int(traffic_from * 1000))
        wanted = {(r["agent"], r["window_start_ms"]) for r in truth.rollups} - before_traffic

        _wait_for(
            lambda: wanted <= set(_written_windows(aggregating)) or None,
            300,
            "every truth window that ended after the traffic started written",
            workers,
        )
        timeline["every window written"] = time.time()
        group = f"{name}.forward"
        caught_up = _wait_for(
            lambda: _forward_done(endpoints.kafka_bootstrap, group, env["PROCESSOR_SAMPLED_TOPIC"]),
            args.catch_up_timeout_s,
            "the forward group's commits at the sampled topic's end",
            workers,
            interval_s=2,
        )
        timeline["forward lag 0 (commits at the topic's end)"] = caught_up
        for running in workers:
            running.note_rss()

        outage = (timeline["Phoenix stop requested"], phoenix_back)
        _print_timeline(timeline, traffic_from)
        floors = asyncio.run(
            _decision_floors(
                endpoints.kafka_bootstrap, env["PROCESSOR_SPANS_TOPIC"], args.lateness_ms
            )
        )
        _print_windows(aggregating, truth, outage, traffic_until, args.lateness_ms, floors)
        _print_spans(endpoints, env, name, outage, monitor, caught_up, workers)
        _print_mlflow(endpoints.mlflow_url, name, truth, before_traffic)
    finally:
        monitor.stop()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.terminate()
            loadgen.wait(timeout=30)
        for running in workers:
            running.stop()
        stack.down()


def _worker_env(
    endpoints: StackEndpoints, name: str, state: Path, args: argparse.Namespace
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PROCESSOR_", "KAFKA_", "MLFLOW_", "PHOENIX_"))
    }
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "MLFLOW_TRACKING_URI": endpoints.mlflow_url,
            "MLFLOW_EXPERIMENT_NAME": name,
            "PHOENIX_COLLECTOR_ENDPOINT": endpoints.phoenix_url,
            "PROCESSOR_APP_ID": name,
            "PROCESSOR_SPANS_TOPIC": f"{name}.spans",
            "PROCESSOR_SPANS_PARTITIONS": str(args.partitions),
            "PROCESSOR_DEAD_LETTER_TOPIC": f"{name}.dlq",
            "PROCESSOR_PARTIALS_TOPIC": f"{name}.partials",
            "PROCESSOR_SUMMARIES_TOPIC": f"{name}.summaries",
            "PROCESSOR_ALERTS_TOPIC": f"{name}.alerts",
            "PROCESSOR_SAMPLED_TOPIC": f"{name}.sampled",
            "PROCESSOR_PHOENIX_PROJECT": name,
            "PROCESSOR_WINDOW_SIZE_MS": str(WINDOW_MS),
            "PROCESSOR_ALLOWED_LATENESS_MS": str(args.lateness_ms),
            "PROCESSOR_SAMPLING_KEEP_ERRORS": "true" if args.keep_errors else "false",
            "PROCESSOR_PROGRESS_LOG_INTERVAL_S": "1",
            "PROCESSOR_LOG_FORMAT": "json",
            # Any free port, found in the log: other workers on this machine hold 9464 and up.
            "PROCESSOR_METRICS_HOST": "127.0.0.1",
            "PROCESSOR_METRICS_PORT": "0",
            "PROCESSOR_REGISTRY_DIR": str(state / "registry"),
            "PROCESSOR_DATA_DIR": str(state / "faust" / name),
        }
    )
    return env


# -- waiting -------------------------------------------------------------------------------


def _check_alive(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process is not None and worker.process.returncode is None:
            code = worker.process.poll()
            # A SIGKILL is ours (the forward worker's planned death); anything else is news.
            if code is not None and code != -signal.SIGKILL:
                raise SystemExit(f"{worker.name} exited with {code}:\n{worker.tail()}")


def _sleep_until(at: float, workers: list[Worker]) -> None:
    while (left := at - time.time()) > 0:
        _check_alive(workers)
        time.sleep(min(left, 1.0))


def _wait_for(
    probe: Callable[[], T | None],
    timeout_s: float,
    what: str,
    workers: list[Worker],
    interval_s: float = 1,
) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(workers)
        found = probe()
        if found:
            return found
        time.sleep(interval_s)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _logged(worker: Worker, text: str) -> bool:
    return any(text in entry.get("message", "") for entry in worker.entries())


# -- reading the results --------------------------------------------------------------------


def _written_windows(worker: Worker) -> dict[tuple[str, int], float]:
    """{(agent, window start ms): wall time of its first "wrote window" line}."""
    written: dict[tuple[str, int], float] = {}
    for entry in worker.entries():
        found = WROTE_WINDOW.match(entry.get("message", ""))
        if found:
            key = (found.group(2), int(found.group(1)))
            if key not in written:  # a replay may write it again; the first write counts
                written[key] = datetime.fromisoformat(entry["ts"]).timestamp()
    return written


def _forward_lag(client: httpx.Client, url: str | None) -> int | None:
    """trace_processor_forward_lag_messages summed over partitions; None: none reported."""
    if url is None:
        return None
    try:
        text = client.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return None
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "trace_processor_forward_lag_messages"
    ]
    return int(sum(values)) if values else None


def _forward_done(bootstrap: str, group: str, topic: str) -> float | None:
    """The time when the forward group has committed every partition's end, else None.

    Asked of Kafka, not of the forward worker: its lag gauge uses the high watermark of its
    last fetch, which a paused or just-restarted consumer may not have updated."""

    async def check() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        consumer = _reader(bootstrap, topic)
        await consumer.start()
        try:
            ends = await consumer.end_offsets(list(consumer.assignment()))
        finally:
            await consumer.stop()
        return bool(ends) and all(
            tp in committed and committed[tp].offset >= end for tp, end in ends.items()
        )

    return time.time() if asyncio.run(check()) else None


def _reader(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    """A consumer of no group: it is assigned every partition of ``topic`` when it starts."""
    return AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )


async def _sampled_topic(bootstrap: str, topic: str) -> tuple[list[str], int]:
    """Every span id of every record in the sampled topic, and how many records it holds."""
    consumer = _reader(bootstrap, topic)
    await consumer.start()
    try:
        partitions = list(consumer.assignment())
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        ids: list[str] = []
        records = 0
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for tp, batch in (await consumer.getmany(timeout_ms=1_000)).items():
                for record in batch:
                    if record.offset < ends[tp]:
                        records += 1
                        ids.extend(span.span_id.hex() for _, span in spans_of_record(record.value))
        return ids, records
    finally:
        await consumer.stop()


async def _decision_floors(bootstrap: str, topic: str, lateness_ms: int) -> dict[int, int]:
    """{window start ms: the latest event time at which a trace counted in the window is due
    for its sampling decision}, read back from the spans topic.

    A window closes only once no span counted in it waits for its trace's decision
    (partition.py), and a trace is due when the watermark reaches its root's end + the
    decision grace (or its first span's end + the maximum wait): so the watermark, which
    trails the newest end time by the allowed lateness, must pass this mark before the window
    can be written. A trace is published when its root ends; its spans in a window whose end
    the watermark had passed by then (root end - lateness) are late, counted in the newest
    window, and hold no old one.
    """
    defaults = WorkerSettings.model_fields
    grace_ms = int(defaults["sampling_decision_grace_ms"].default)
    max_wait_ms = int(defaults["sampling_decision_max_wait_ms"].default)
    traces: dict[bytes, tuple[int | None, int, set[int]]] = {}  # root end, min end, windows
    consumer = _reader(bootstrap, topic)
    await consumer.start()
    try:
        partitions = list(consumer.assignment())
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            for tp, batch in (await consumer.getmany(timeout_ms=1_000)).items():
                for record in batch:
                    if record.offset >= ends[tp] or record.value is None:
                        continue
                    request = ExportTraceServiceRequest.FromString(record.value)
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                end_ms = span.end_time_unix_nano // 1_000_000
                                root, first, windows = traces.get(
                                    span.trace_id, (None, end_ms, set())
                                )
                                if not span.parent_span_id:
                                    root = end_ms if root is None else min(root, end_ms)
                                windows.add(end_ms - end_ms % WINDOW_MS)
                                traces[span.trace_id] = (root, min(first, end_ms), windows)
    finally:
        await consumer.stop()
    floors: dict[int, int] = {}
    for root, first, windows in traces.values():
        due = first + max_wait_ms if root is None else min(root + grace_ms, first + max_wait_ms)
        arrived = first if root is None else root  # about when the watermark saw it
        for start in windows:
            if arrived - lateness_ms < start + WINDOW_MS:  # not late: it holds the window
                floors[start] = max(floors.get(start, due), due)
    return floors


def _phoenix_span_ids(phoenix_url: str, project: str) -> list[str]:
    """Every span id Phoenix holds for ``project``, through its REST API."""
    ids: list[str] = []
    cursor: str | None = None
    with httpx.Client(base_url=phoenix_url, timeout=120, trust_env=False) as client:
        while True:
            params: dict[str, str | int] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            response = client.get(f"/v1/projects/{project}/spans", params=params)
            if response.status_code == 404:
                return []
            response.raise_for_status()
            body = response.json()
            ids.extend(span["context"]["span_id"] for span in body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                return ids


def _mlflow_rollups(mlflow_url: str, experiment: str) -> dict[tuple[str, int], dict[str, float]]:
    """{(agent, window step): {metric: value}}, the latest value of each."""
    from mlflow.tracking import MlflowClient  # slow to import: only when needed

    client = MlflowClient(tracking_uri=mlflow_url)
    found_experiment = client.get_experiment_by_name(experiment)
    if found_experiment is None:
        return {}
    found: dict[tuple[str, int], dict[str, float]] = {}
    token = None
    while True:
        page = client.search_runs(
            [found_experiment.experiment_id], max_results=500, page_token=token
        )
        for run in page:
            agent = run.data.tags["agent"]
            for metric in MLFLOW_METRICS:
                for point in client.get_metric_history(run.info.run_id, metric):
                    found.setdefault((agent, point.step), {})[metric] = point.value
        token = page.token
        if not token:
            return found


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- printing -------------------------------------------------------------------------------


def _print_timeline(timeline: dict[str, float], origin: float) -> None:
    table = Table("event", "s after the first trace")
    for event, at in sorted(timeline.items(), key=lambda item: item[1]):
        table.add_row(event, f"{at - origin:.1f}")
    console.print(table)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1] if ordered else float("nan")


def _print_windows(
    worker: Worker,
    truth: Truth,
    outage: tuple[float, float],
    traffic_until: float,
    lateness_ms: int,
    floors: dict[int, int],
) -> None:
    written = _written_windows(worker)
    limit_s = lateness_ms / 1000 + 5

    def phase(window_start_ms: int) -> str:
        end_s = (window_start_ms + WINDOW_MS) / 1000
        if end_s > traffic_until:
            return "tail (after the traffic)"
        if end_s < outage[0]:
            return "before the outage"
        if end_s < outage[1]:
            return "Phoenix down"
        return "Phoenix back"

    def floor_s(window_start_ms: int) -> float:
        """The earliest a window can be written after its end, by the rules: its last
        decision's due time plus the lateness (the watermark's lag behind the clock)."""
        due = floors.get(window_start_ms)
        return (
            float("nan")
            if due is None
            else (due + lateness_ms - window_start_ms - WINDOW_MS) / 1000
        )

    phases = ("before the outage", "Phoenix down", "Phoenix back", "tail (after the traffic)")
    expected: dict[str, int] = dict.fromkeys(phases, 0)
    for rollup in truth.rollups:
        expected[phase(rollup["window_start_ms"])] += 1
    delays: dict[str, list[tuple[float, float]]] = {p: [] for p in phases}
    for (_, start_ms), at in written.items():
        delays[phase(start_ms)].append((at - (start_ms + WINDOW_MS) / 1000, floor_s(start_ms)))
    table = Table(
        "phase (by window end)",
        "windows in truth",
        "windows written",
        "max delay (s)",
        "p95 delay (s)",
        f"delay > lateness + 5 s = {limit_s:g} s",
        "max floor (s): last decision due + lateness",
        f"floor > {limit_s:g} s",
        "max delay - floor (s)",
    )
    for name in phases:
        found = [delay for delay, _ in delays[name]]
        floors_here = [floor for _, floor in delays[name] if not math.isnan(floor)]
        over_floor = [delay - floor for delay, floor in delays[name] if not math.isnan(floor)]
        table.add_row(
            name,
            str(expected[name]),
            str(len(found)),
            f"{max(found):.1f}" if found else "-",
            f"{_p95(found):.1f}" if found else "-",
            str(sum(1 for d in found if d > limit_s)),
            f"{max(floors_here):.1f}" if floors_here else "-",
            str(sum(1 for f in floors_here if f > limit_s)),
            f"{max(over_floor):.1f}" if over_floor else "-",
        )
    console.print(table)


def _print_spans(
    endpoints: StackEndpoints,
    env: dict[str, str],
    project: str,
    outage: tuple[float, float],
    monitor: Monitor,
    caught_up: float,
    workers: list[Worker],
) -> None:
    topic_ids, records = asyncio.run(
        _sampled_topic(endpoints.kafka_bootstrap, env["PROCESSOR_SAMPLED_TOPIC"])
    )
    stored = _phoenix_span_ids(endpoints.phoenix_url, project)
    kept, in_phoenix = set(topic_ids), set(stored)
    phoenix_back = outage[1]
    first_zero = next(
        (at for at, lag in monitor.lag if at >= phoenix_back and lag == 0), float("nan")
    )

    def peak_lag(since: float, until: float) -> str:
        lags = [lag for at, lag in monitor.lag if since <= at < until and lag is not None]
        return f"{max(lags):,}" if lags else "-"

    table = Table("kept spans and forwarding", "value")
    rows = [
        ("sampled topic: records", f"{records:,}"),
        ("sampled topic: kept spans (distinct span ids)", f"{len(kept):,}"),
        ("sampled topic: span ids written more than once", f"{len(topic_ids) - len(kept):,}"),
        ("Phoenix: spans of the project (distinct)", f"{len(in_phoenix):,}"),
        ("Phoenix: spans of the project (total)", f"{len(stored):,}"),
        ("Phoenix: duplicates (total - distinct)", f"{len(stored) - len(in_phoenix):,}"),
        ("missing (kept, not in Phoenix)", f"{len(kept - in_phoenix):,}"),
        ("in Phoenix but not kept", f"{len(in_phoenix - kept):,}"),
        ("peak forward lag gauge before the outage (records)", peak_lag(0, outage[0])),
        ("peak forward lag gauge, Phoenix down (records)", peak_lag(*outage)),
        ("peak forward lag gauge, Phoenix back (records)", peak_lag(outage[1], math.inf)),
        ("Phoenix back -> first forward lag gauge 0 (s)", f"{first_zero - phoenix_back:.1f}"),
        (
            "Phoenix back -> forward commits at the topic's end (s)",
            f"{caught_up - phoenix_back:.1f}",
        ),
    ]
    for worker in workers:
        rows.append(
            (f"peak RSS of {worker.name} (MiB, VmHWM)", f"{worker.peak_rss_kib / 1024:.0f}")
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _ended_before(truth: Truth, at_ms: int) -> set[tuple[str, int]]:
    """(agent, window start) of the truth's windows that ended by ``at_ms``: before the
    traffic started, they hold only late spans (see the module docstring)."""
    return {
        (r["agent"], r["window_start_ms"])
        for r in truth.rollups
        if r["window_start_ms"] + WINDOW_MS <= at_ms
    }


def _print_mlflow(
    mlflow_url: str, experiment: str, truth: Truth, before_traffic: set[tuple[str, int]]
) -> None:
    found = _mlflow_rollups(mlflow_url, experiment)
    expected: dict[tuple[str, int], dict[str, Any]] = {
        (r["agent"], r["window_start_ms"] // WINDOW_MS): dict(r)
        for r in truth.rollups
        if (r["agent"], r["window_start_ms"]) not in before_traffic
    }
    equal = sum(
        1
        for key, want in expected.items()
        if key in found and all(found[key].get(m) == want[m] for m in EXACT)
    )
    missing = sum(1 for key in expected if key not in found)
    # The agents' windows: the all-agents series counts the same spans again.
    agents = [metrics for (agent, _), metrics in found.items() if agent != ALL_AGENTS]
    late = sum(int(metrics.get("late_spans", 0)) for metrics in agents)
    spans = sum(int(metrics.get("spans", 0)) for metrics in agents)
    sampled = sum(int(metrics.get("sampled_spans", 0)) for metrics in agents)
    table = Table("MLflow against loadgen's truth", "value")
    for row in (
        ("windows in the truth", f"{len(expected) + len(before_traffic):,}"),
        ("of them ended before the traffic started (late on arrival)", f"{len(before_traffic):,}"),
        (f"MLflow windows equal to the truth ({', '.join(EXACT)} exact)", f"{equal:,}"),
        ("truth windows differing", f"{len(expected) - equal - missing:,}"),
        ("truth windows missing from MLflow", f"{missing:,}"),
        ("MLflow windows not in the truth", f"{sum(1 for key in found if key not in expected):,}"),
        ("spans published (truth)", f"{truth.span_count:,}"),
        ("MLflow spans + late_spans (all windows)", f"{spans + late:,}"),
        ("MLflow late_spans (all windows)", f"{late:,}"),
        ("MLflow sampled_spans (all windows)", f"{sampled:,}"),
    ):
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
