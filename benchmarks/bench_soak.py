"""A soak: one worker under a steady stream for a long while. Do memory and lag level off?

    .venv/bin/python benchmarks/bench_soak.py [--minutes 30] [--spans-per-second 5000]

Starts (or reuses) a local stack under ``.stack-soak/`` on its own ports, one
`trace-processor worker` with every role (forwarding to Phoenix on, the default sampling
policy: 10% of traces at random plus every trace with an error), and a real-time
`trace-processor loadgen` publishing ``--spans-per-second`` (as traces of ``--trace-size``
spans) for ``--minutes``. Every minute it prints one row:

- the worker's RSS (VmRSS, MiB) and CPU share over the minute;
- spans/s the worker handled over the minute, and the traces (trace buffers) and spans
  (samplers) it held at the minute's end, from its progress lines;
- the aggregate group's consumer lag (records of the spans topic after its committed offsets,
  asked of the broker: about a window plus the lateness of traffic is normal, since offsets
  stay uncommitted while their window is open), and the forwarding lag (records of the sampled
  topic after the forward group's commits, i.e. not yet in Phoenix);
- the rollup delay: for the windows written during the minute, the longest time from a
  window's end + allowed lateness to its "wrote window" log line (MLflow has it then).

At the end it compares the last third of the rows with the middle third (growth per minute)
and says which series levelled off. No assertions: the numbers are the result.

Traces are published whole when their root ends (one message per trace), so a span reaches
Kafka its trace's duration after its end time; ``--latency-scale 0.1`` (the default here)
keeps traces to ~2 s, so few spans arrive after their window closed (as in
bench_phoenix_outage.py). Phoenix on SQLite writes a few hundred spans/s: a sample larger
than that makes the forwarding lag grow for as long as the stream lasts, which is what this
shows, not a fault of the worker (see docs/operations.md, *Phoenix's pace*).
``--phoenix-max-spans-per-second`` sets the sample's budget; it applies after the rules that
always keep, so with errors kept (the loadgen's traces mostly hold one) only
``--no-keep-errors`` with a budget below Phoenix's write rate keeps that lag flat.

The worker runs from a venv of its own (``.stack-soak/worker-venv``) with only the worker's
runtime dependencies, as deployed (its RSS is the deployed one); ``--dev-venv`` runs it from
this interpreter. Everything this starts is stopped on exit, Ctrl-C included; services of
the stack that were already running are left running, and ``--keep-stack`` leaves all of
them running for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

# The script's folder is on sys.path: the worker and its venv as the other benchmarks run them.
from bench_phoenix_outage import WROTE_WINDOW, Worker, _worker_env
from bench_worker import _process_cpu_seconds, _worker_venv
from rich.console import Console
from rich.table import Table

from processor.settings import StackSettings
from processor.stack import LocalStack

PROGRESS = re.compile(
    r"^progress messages=\d+ spans=(\d+) .*buffered_traces=(\d+) sampler_spans=(\d+)"
)
STATE = Path(".stack-soak")
# Below Linux's ephemeral range (32768-60999), like the other benchmarks' restartable ports.
PORTS = {
    "kafka_port": 32092,
    "kafka_controller_port": 32093,
    "phoenix_port": 32006,
    "phoenix_grpc_port": 32317,
    "mlflow_port": 32500,
}
COLUMNS = (
    "min",
    "load avg",
    "traces/s in",
    "RSS MiB",
    "CPU %",
    "spans/s",
    "traces buffered",
    "sampler spans",
    "aggregate lag (records)",
    "forward lag (records)",
    "rollup delay max (s)",
    "windows written",
)
console = Console(width=160)


@dataclass(frozen=True)
class Row:
    """One minute of the soak."""

    minute: float  # since the stream started
    load: float  # the machine's 1-minute load average: the worker's share of the CPU
    published_per_s: float | None  # records (traces) of the spans topic per second
    rss_mib: float
    cpu_share: float  # of one core, over the minute
    spans_per_s: float
    buffered_traces: int | None
    sampler_spans: int | None
    aggregate_lag: int | None
    forward_lag: int | None
    rollup_delay_s: float | None  # max over the windows written in the minute
    windows: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the stream runs")
    parser.add_argument("--spans-per-second", type=float, default=5_000.0)
    parser.add_argument("--trace-size", type=int, default=20, help="mean spans per trace")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--latency-scale", type=float, default=0.1, help="see the docstring")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--window-ms", type=int, default=60_000, help="the worker's window")
    parser.add_argument(
        "--lateness-ms", type=int, default=5_000, help="the worker's allowed lateness"
    )
    parser.add_argument(
        "--keep-errors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every trace with an error (the default policy)",
    )
    parser.add_argument(
        "--phoenix-max-spans-per-second",
        type=float,
        default=None,
        help="the sample's budget (PROCESSOR_PHOENIX_MAX_SPANS_PER_SECOND): below Phoenix's "
        "write rate the forwarding lag levels off; unset, it grows while the stream lasts",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run the worker from this interpreter instead of a venv holding only the "
        "worker's own dependencies, as deployed",
    )
    parser.add_argument(
        "--keep-stack", action="store_true", help="leave the stack running at the end"
    )
    args = parser.parse_args()
    # SIGTERM ends the run as Ctrl-C does: through the clean-up below. SIGINT too when a
    # shell started this in the background, which makes it ignore SIGINT.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    state = STATE.resolve()
    state.mkdir(exist_ok=True)
    stack = LocalStack(
        StackSettings.model_validate({"dir": state, "start_timeout_s": 600, **PORTS}),
        console=console,
    )
    started_here = [name for name, status in stack.status().items() if not status.running]
    worker: Worker | None = None
    loadgen: subprocess.Popen[bytes] | None = None
    rows: list[Row] = []
    try:
        python = sys.executable if args.dev_venv else _worker_venv(state / "worker-venv")
        endpoints = stack.up()
        name = f"soak-{time.strftime('%H%M%S')}"
        run_dir = state / "runs" / name
        run_dir.mkdir(parents=True)
        env = _worker_env(endpoints, name, state, args)
        env["PROCESSOR_WINDOW_SIZE_MS"] = str(args.window_ms)
        env["PROCESSOR_PROGRESS_LOG_INTERVAL_S"] = "10"
        if args.phoenix_max_spans_per_second is not None:
            env["PROCESSOR_PHOENIX_MAX_SPANS_PER_SECOND"] = str(args.phoenix_max_spans_per_second)
        worker = Worker(
            "worker",
            [python, "-m", "processor.cli", "worker"],
            {**env, "PROCESSOR_WORKER_ID": name},
            run_dir / "worker.log",
        ).start()
        _wait_until_serving(worker)
        rate = args.spans_per_second / args.trace_size
        console.print(
            f"run {name}: worker pid {worker.process.pid if worker.process else '?'} with "
            f"{python}, {args.spans_per_second:,.0f} spans/s ({rate:g} traces/s of "
            f"~{args.trace_size} spans) for {args.minutes:g} min; logs in {run_dir}"
        )
        with (run_dir / "loadgen.log").open("ab") as loadgen_log:
            loadgen = subprocess.Popen(
                [
                    sys.executable, "-m", "processor.cli", "loadgen",
                    "--bootstrap", endpoints.kafka_bootstrap,
                    "--topic", env["PROCESSOR_SPANS_TOPIC"],
                    "--partitions", str(args.partitions),
                    "--rate", str(rate),
                    "--duration", str(args.minutes * 60),
                    "--agents", str(args.agents),
                    "--trace-size", str(args.trace_size),
                    "--latency-scale", str(args.latency_scale),
                    "--window-size-ms", str(args.window_ms),
                    "--no-progress",
                ],
                stdout=loadgen_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        _soak(args, worker, loadgen, endpoints.kafka_bootstrap, env, name, rows)
        _print_levels(rows)
        # It started after our clock and may run behind: let it finish and say what it sent.
        with contextlib.suppress(subprocess.TimeoutExpired):
            loadgen.wait(timeout=120)
        console.print(f"loadgen: {_last_line(run_dir / 'loadgen.log')}")
        console.print(f"peak RSS (VmHWM): {worker.peak_rss_kib / 1024:,.0f} MiB")
    finally:
        if rows and len(rows) < math.ceil(args.minutes):
            _print_levels(rows)  # interrupted: what was measured so far
        if loadgen is not None and loadgen.poll() is None:
            loadgen.terminate()
            try:
                loadgen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                loadgen.kill()
        if worker is not None:
            worker.stop()
        if not args.keep_stack and started_here:
            stack.down(started_here)


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return lines[-1] if lines else "(no output)"


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _wait_until_serving(worker: Worker, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (worker.url and any("worker up" in e.get("message", "") for e in worker.entries())):
        if not worker.alive:
            raise SystemExit(f"the worker exited:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker did not come up in {timeout_s:.0f} s:\n{worker.tail()}")
        time.sleep(1)


def _soak(
    args: argparse.Namespace,
    worker: Worker,
    loadgen: subprocess.Popen[bytes],
    bootstrap: str,
    env: dict[str, str],
    name: str,
    rows: list[Row],
) -> None:
    """One row a minute until the stream ends."""
    assert worker.process is not None
    pid = worker.process.pid
    groups = {name: env["PROCESSOR_SPANS_TOPIC"], f"{name}.forward": env["PROCESSOR_SAMPLED_TOPIC"]}
    table = _table()
    console.print(" | ".join(COLUMNS))
    started = time.time()
    last_at, last_cpu, last_spans, last_published = started, _process_cpu_seconds(pid), 0, 0
    for minute in range(1, math.ceil(args.minutes) + 1):
        due = started + minute * 60
        while (left := due - time.time()) > 0:
            if not worker.alive:
                raise SystemExit(f"the worker exited:\n{worker.tail()}")
            time.sleep(min(left, 1.0))
        now, cpu = time.time(), _process_cpu_seconds(pid)
        worker.note_rss()
        spans, traces, sampler = _progress(worker)
        windows = _windows_written(worker, last_at, now, args.window_ms + args.lateness_ms)
        lags, published = asyncio.run(_broker_view(bootstrap, groups, env["PROCESSOR_SPANS_TOPIC"]))
        row = Row(
            minute=(now - started) / 60,
            load=os.getloadavg()[0],
            published_per_s=(
                None if published is None else (published - last_published) / (now - last_at)
            ),
            rss_mib=_vm_rss_kib(pid) / 1024,
            cpu_share=(cpu - last_cpu) / (now - last_at),
            spans_per_s=(spans - last_spans) / (now - last_at),
            buffered_traces=traces,
            sampler_spans=sampler,
            aggregate_lag=lags[name],
            forward_lag=lags[f"{name}.forward"],
            rollup_delay_s=max(windows) if windows else None,
            windows=len(windows),
        )
        rows.append(row)
        console.print(" | ".join(_cells(row)), highlight=False)
        last_at, last_cpu, last_spans = now, cpu, spans
        last_published = published if published is not None else last_published
        if loadgen.poll() not in (None, 0):
            raise SystemExit(f"loadgen failed ({loadgen.returncode}); see its log")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)


def _table() -> Table:
    return Table(*COLUMNS, title="one worker, every role: a row a minute")


def _cells(row: Row) -> list[str]:
    def number(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    return [
        f"{row.minute:.1f}",
        f"{row.load:.1f}",
        "-" if row.published_per_s is None else f"{row.published_per_s:,.0f}",
        f"{row.rss_mib:,.0f}",
        f"{row.cpu_share:.0%}",
        f"{row.spans_per_s:,.0f}",
        number(row.buffered_traces),
        number(row.sampler_spans),
        number(row.aggregate_lag),
        number(row.forward_lag),
        "-" if row.rollup_delay_s is None else f"{row.rollup_delay_s:.1f}",
        str(row.windows),
    ]


def _progress(worker: Worker) -> tuple[int, int | None, int | None]:
    """Spans handled, traces and sampler spans held, from the worker's last progress line."""
    last: tuple[int, int | None, int | None] = (0, None, None)
    for entry in worker.entries():
        found = PROGRESS.match(entry.get("message", ""))
        if found:
            last = (int(found.group(1)), int(found.group(2)), int(found.group(3)))
    return last


def _windows_written(worker: Worker, since: float, until: float, due_after_ms: int) -> list[float]:
    """For each window written between ``since`` and ``until`` (wall clock, its first write),
    how long after its end + the allowed lateness it was written."""
    delays: dict[tuple[str, int], float] = {}
    for entry in worker.entries():
        found = WROTE_WINDOW.match(entry.get("message", ""))
        if not found:
            continue
        key = (found.group(2), int(found.group(1)))
        if key in delays:  # a replay writes it again; the first write counts
            continue
        at = datetime.fromisoformat(entry["ts"]).timestamp()
        delays[key] = at - (key[1] + due_after_ms) / 1000 if since <= at < until else math.nan
    return [delay for delay in delays.values() if not math.isnan(delay)]


async def _broker_view(
    bootstrap: str, groups: dict[str, str], spans_topic: str
) -> tuple[dict[str, int | None], int | None]:
    """{group: records of its topic after its committed offsets}, and the records the spans
    topic holds (None: the broker said nothing). Asked of the broker, not of the worker, whose
    gauges follow its own fetches."""
    lags: dict[str, int | None] = dict.fromkeys(groups)
    published: int | None = None
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    # No group: it is assigned every partition of the topics and commits nothing.
    consumer = AIOKafkaConsumer(
        *sorted(set(groups.values())), bootstrap_servers=bootstrap, enable_auto_commit=False
    )
    try:
        await admin.start()
        await consumer.start()
        ends = await consumer.end_offsets(list(consumer.assignment()))
        published = sum(end for tp, end in ends.items() if tp.topic == spans_topic)
        for group, topic in groups.items():
            committed = await admin.list_consumer_group_offsets(group)
            lags[group] = sum(
                end - max(committed[tp].offset if tp in committed else 0, 0)
                for tp, end in ends.items()
                if tp.topic == topic
            )
    except Exception as exc:  # a slow broker costs one row's cells, not the run
        console.print(f"offsets not read: {type(exc).__name__}: {exc}")
    finally:
        await consumer.stop()
        await admin.close()
    return lags, published


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _print_levels(rows: list[Row]) -> None:
    """Did each series level off? Its growth per minute from the middle third of the rows
    to the last third, against a tolerance."""
    if len(rows) < 3:
        console.print("fewer than 3 rows: nothing to compare")
        return
    third = len(rows) // 3
    middle, last = rows[third : 2 * third], rows[2 * third :]
    series: list[tuple[str, str, float, float | None]] = [
        # name, unit, absolute tolerance per minute, relative tolerance (of the middle mean)
        ("RSS", "MiB", 1.0, None),
        ("traces buffered", "traces", 0.0, 0.02),
        ("sampler spans", "spans", 0.0, 0.02),
        ("aggregate lag", "records", 100.0, 0.02),
        ("forward lag", "records", 100.0, 0.02),
        ("rollup delay max", "s", 0.5, None),
    ]
    fields = {
        "RSS": "rss_mib",
        "traces buffered": "buffered_traces",
        "sampler spans": "sampler_spans",
        "aggregate lag": "aggregate_lag",
        "forward lag": "forward_lag",
        "rollup delay max": "rollup_delay_s",
    }
    table = Table(
        "series",
        f"middle third (min {middle[0].minute:.0f}-{middle[-1].minute:.0f}) mean",
        f"last third (min {last[0].minute:.0f}-{last[-1].minute:.0f}) mean",
        "growth per minute",
        "tolerance per minute",
        "levelled off?",
        title="middle third against last third",
    )
    for label, unit, absolute, relative in series:
        before = _mean_of(middle, fields[label])
        after = _mean_of(last, fields[label])
        if before is None or after is None:
            table.add_row(label, "-", "-", "-", "-", "not measured")
            continue
        span = statistics.fmean(r.minute for r in last) - statistics.fmean(r.minute for r in middle)
        growth = (after - before) / span
        tolerance = max(absolute, (relative or 0.0) * abs(before))
        table.add_row(
            label,
            f"{before:,.1f} {unit}",
            f"{after:,.1f} {unit}",
            f"{growth:+,.1f} {unit}/min",
            f"{tolerance:,.1f} {unit}/min",
            "yes" if growth <= tolerance else "no, still growing",
        )
    console.print(table)


def _mean_of(rows: list[Row], field: str) -> float | None:
    values = [getattr(row, field) for row in rows if getattr(row, field) is not None]
    return statistics.fmean(values) if values else None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # everything is stopped by now; no traceback for a Ctrl-C
        sys.exit(130)
