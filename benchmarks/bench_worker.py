"""Throughput and memory of whole worker processes reading from a real Kafka.

    .venv/bin/python benchmarks/bench_worker.py --traces 8000 --workers 1 2 [--phoenix]

With ``--phoenix``, 10% of the traces (sampled at random, errors not kept on their own) are
written to the sampled topic and forwarded to the local Phoenix by the forward role in the same
process, at Phoenix's pace: the spans/s are those aggregated, which no longer wait for Phoenix;
without it forwarding is off (the sampler still runs). Only
the probability can then keep a trace, so each is decided on its first span; with
``--latency-threshold-ms`` (e.g. 600000, which no loadgen trace reaches) every trace waits in
the sampler for its decision, as with the default policy's error rule.

The workers run from a venv of their own (``.stack-bench/worker-venv``) with only the
worker's runtime dependencies, as deployed; ``--dev-venv`` runs them from this interpreter.
Starts (or reuses) a local stack under ``.stack-bench/`` on its own ports, publishes the
traces once (event time in the past, one ~100-span message per trace), then for each worker
count runs that many `trace-processor worker` processes with a fresh consumer group over the
same topic and prints spans/s (from the workers' progress lines, first span to last span;
and from the group's last assignment to the last span, which leaves out the start-up
rebalance of several workers joining one after the other),
peak RSS per worker (VmHWM), how long after the last span the last window reached MLflow and
the most traces (trace buffers) and spans (samplers) a worker held at once.
No assertions: the numbers are the result.

The traces' event times follow ``--event-rate`` (traces per second): 500, the default, is a
live stream of 50,000 spans/s; with the allowed lateness it sets how much the buffers hold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from processor.loadgen import Scenario, TraceGenerator, publish_traces
from processor.settings import StackSettings
from processor.stack import LocalStack

# A worker's progress line: its log time, the spans it has handled, its monotonic clock.
PROGRESS = re.compile(r"^(\S+ \S+) .*progress messages=\d+ spans=(\d+) .* monotonic=([\d.]+)", re.M)
# The group's assignments, on the log's clock.
ASSIGNED_AT = re.compile(r"^(\S+ \S+) .*Setting newly assigned partitions", re.M)
BUFFERS = re.compile(r"buffered_traces=(\d+) sampler_spans=(\d+)")
console = Console(width=170)  # the table is wide: not cut to a terminal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=8000)
    parser.add_argument("--trace-size", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--lateness-ms",
        type=int,
        default=5_000,
        help="the workers' allowed lateness (the default's): with the event rate, it sets how "
        "many traces and spans the buffers hold",
    )
    parser.add_argument(
        "--event-rate",
        type=float,
        default=500.0,
        help="traces per second of event time: 500 (50,000 spans/s of 100-span traces) is a "
        "live stream at the target rate; a low rate replays a backlog, closing windows (and "
        "writing them to MLflow) many times faster than a live stream does",
    )
    parser.add_argument("--phoenix", action="store_true", help="forward spans to Phoenix too")
    parser.add_argument(
        "--latency-threshold-ms",
        type=int,
        default=None,
        help="also keep traces this slow (a tail rule): every trace then waits in the sampler "
        "for its decision; without a rule only the probability can keep a trace, and each is "
        "decided on its first span",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run the workers from this interpreter (with the stack and test extras) instead "
        "of a venv holding only the worker's own dependencies, as deployed",
    )
    args = parser.parse_args()

    state = Path(".stack-bench").resolve()
    python = sys.executable if args.dev_venv else _worker_venv(state / "worker-venv")
    console.print(f"workers run with {python}")
    stack = LocalStack(
        StackSettings(
            dir=state,
            kafka_port=49092,
            kafka_controller_port=49093,
            phoenix_port=49006,
            phoenix_grpc_port=49317,
            mlflow_port=49500,
        )
    )
    endpoints = stack.up()
    run_id = time.strftime("%H%M%S")
    topic = f"bench-{run_id}.spans"

    started = time.monotonic()
    start_ms = time.time_ns() // 1_000_000 - 3 * 3600 * 1000
    scenario = Scenario(agents=10, trace_size=args.trace_size, seed=5, latency_scale=0.1)
    generator = TraceGenerator(scenario, start_ms=start_ms, rate=args.event_rate)
    traces = list(generator.generate(args.traces))
    total_spans = sum(trace.span_count for trace in traces)
    console.print(
        f"generated {len(traces)} traces, {total_spans} spans in {time.monotonic() - started:.1f}s"
    )
    stats = asyncio.run(
        publish_traces(
            traces, bootstrap=endpoints.kafka_bootstrap, topic=topic, partitions=args.partitions
        )
    )
    console.print(f"published: {stats.summary()}")
    del traces

    table = Table(
        "workers",
        "spans/s (all)",
        "spans/s per worker",
        "spans/s after the last rebalance (all)",
        "peak RSS per worker (MiB)",
        "last window in MLflow after last span (s)",
        "machine CPU busy (all processes)",
        "spans per CPU-second of a worker",
        "peak traces / sampler spans buffered per worker",
    )
    for count in args.workers:
        name = f"bench-{run_id}-{count}w"
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "MLFLOW_TRACKING_URI": endpoints.mlflow_url,
            "MLFLOW_EXPERIMENT_NAME": name,
            "PHOENIX_COLLECTOR_ENDPOINT": endpoints.phoenix_url,
            "PROCESSOR_APP_ID": name,
            "PROCESSOR_SPANS_TOPIC": topic,
            "PROCESSOR_SPANS_PARTITIONS": str(args.partitions),
            "PROCESSOR_DEAD_LETTER_TOPIC": f"{name}.dlq",
            "PROCESSOR_PARTIALS_TOPIC": f"{name}.partials",
            "PROCESSOR_SUMMARIES_TOPIC": f"{name}.summaries",
            "PROCESSOR_ALERTS_TOPIC": f"{name}.alerts",
            "PROCESSOR_SAMPLED_TOPIC": f"{name}.sampled",
            "PROCESSOR_PHOENIX_ENABLED": "true" if args.phoenix else "false",
            "PROCESSOR_PHOENIX_PROJECT": name,
            # 10% of the traces, at random: loadgen's 100-span traces nearly all hold an
            # error span, which the default policy would keep too.
            "PROCESSOR_SAMPLING_PROBABILITY": "0.1",
            "PROCESSOR_SAMPLING_KEEP_ERRORS": "false",
            **(
                {"PROCESSOR_SAMPLING_LATENCY_THRESHOLD_MS": str(args.latency_threshold_ms)}
                if args.latency_threshold_ms is not None
                else {}
            ),
            "PROCESSOR_ALLOWED_LATENESS_MS": str(args.lateness_ms),
            "PROCESSOR_IDLE_TIMEOUT_MS": "3000",
            "PROCESSOR_PROGRESS_LOG_INTERVAL_S": "1",
            "PROCESSOR_DATA_DIR": str(state / "faust" / name),
        }
        logs = [state / f"{name}-{i}.log" for i in range(count)]
        processes = []
        for log_path in logs:
            with log_path.open("wb") as log_file:
                processes.append(
                    subprocess.Popen(
                        [python, "-m", "processor.cli", "worker"],
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
        try:
            cpu_samples: list[tuple[float, int, int]] = []
            worker_cpu: list[tuple[float, float]] = []
            first, last = _wait_for_all_spans(
                logs, total_spans, 900, cpu_samples, [p.pid for p in processes], worker_cpu
            )
            finished = time.monotonic()
            written_after = _wait_for_last_window(logs, timeout_s=300) - finished
            peaks = [_peak_rss_mib(process.pid) for process in processes]
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        rate = total_spans / (last - first) if last > first else float("nan")
        table.add_row(
            str(count),
            f"{rate:,.0f}",
            f"{rate / count:,.0f}",
            f"{_rate_after_last_rebalance(logs):,.0f}",
            ", ".join(f"{peak:.0f}" for peak in peaks),
            f"{written_after:.1f}",
            f"{_busy_share(cpu_samples, first, last):.0%}",
            f"{total_spans / _cpu_seconds(worker_cpu, first, last):,.0f}",
            ", ".join(f"{traces:,} / {spans:,}" for traces, spans in map(_peak_buffers, logs)),
        )
    console.print(table)


def _worker_venv(path: Path) -> str:
    """A venv with this checkout and only its runtime dependencies, as a deployed worker has.

    The extras (Phoenix and MLflow servers, test tools) bring libraries that MLflow's client
    imports when it finds them (pandas, pyarrow, scipy): ~90 MiB of RSS a worker does not have
    in production.
    """
    uv = Path(sys.executable).with_name("uv")
    project = Path(__file__).resolve().parent.parent
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [str(uv), "venv", "--quiet", "--python", sys.executable, str(path)], check=True
        )
    # reinstalled each run: the workers must run the code of this checkout
    subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "--reinstall-package",
            "agent-trace-processor",
            str(project),
        ],
        check=True,
    )
    return str(python)


def _progress(log: Path) -> list[tuple[float, int]]:
    points = []
    for match in PROGRESS.finditer(log.read_text(errors="replace")):
        points.append((float(match.group(3)), int(match.group(2))))
    return points


def _wait_for_all_spans(
    logs: list[Path],
    total: int,
    timeout_s: float,
    cpu_samples: list[tuple[float, int, int]],
    pids: list[int],
    worker_cpu: list[tuple[float, float]],
) -> tuple[float, float]:
    """Monotonic times of the first progress line with spans and of the one reaching total.

    Appends (monotonic, busy ticks, all ticks) of the whole machine to ``cpu_samples`` and
    (monotonic, CPU seconds of the workers ``pids`` together) to ``worker_cpu`` each second
    meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cpu_samples.append((time.monotonic(), *_cpu_ticks()))
        worker_cpu.append((time.monotonic(), sum(map(_process_cpu_seconds, pids))))
        series = [_progress(log) for log in logs]
        done = sum(points[-1][1] for points in series if points)
        if done >= total:
            # the last point before any span, per worker: processing started after it
            starts = [
                max((t for t, spans in points if spans == 0), default=points[0][0])
                for points in series
                if points
            ]
            ends = [
                next(t for t, spans in points if spans == points[-1][1])
                for points in series
                if points
            ]
            return min(starts), max(ends)
        time.sleep(1)
    raise SystemExit(f"workers did not read all {total} spans in {timeout_s}s; see {logs}")


def _rate_after_last_rebalance(logs: list[Path]) -> float:
    """Spans/s of all workers together from the group's last assignment to the last span.

    Workers started together join the group one after the other: the first reads every
    partition until the next joins, then each partition starts again at its committed offset
    (usually its beginning, as no window has closed yet). That start-up costs the same few
    seconds however long the run, so this rate leaves it out: the spans the workers handled
    after the last assignment (re-read ones included), over the time they took.
    """
    texts = [log.read_text(errors="replace") for log in logs]
    assigned = [_log_time(m.group(1)) for text in texts for m in ASSIGNED_AT.finditer(text)]
    if not assigned:
        return float("nan")
    since = max(assigned)
    handled, ends = 0.0, []
    for text in texts:
        points = [(_log_time(m.group(1)), int(m.group(2))) for m in PROGRESS.finditer(text)]
        if not points:
            continue
        final = points[-1][1]
        ends.append(next(t for t, spans in points if spans == final))
        handled += final - _spans_at(points, since)
    elapsed = max(ends) - since
    return handled / elapsed if elapsed > 0 else float("nan")


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _spans_at(points: list[tuple[float, int]], at: float) -> float:
    """A worker's handled-spans count at time ``at``, interpolated between progress lines."""
    before = [(t, spans) for t, spans in points if t <= at]
    after = [(t, spans) for t, spans in points if t > at]
    if not before:
        return 0.0
    if not after:
        return float(before[-1][1])
    (t0, s0), (t1, s1) = before[-1], after[0]
    return s0 + (s1 - s0) * (at - t0) / (t1 - t0)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, all) jiffies of every core since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def _process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(samples: list[tuple[float, float]], first: float, last: float) -> float:
    """CPU seconds the workers used from ``first`` to ``last``, from the samples around them.

    Unlike spans/s this does not depend on how much of the machine the workers got: on a
    shared machine it is the steadier measure of their cost per span.
    """
    before = max((s for s in samples if s[0] <= first), default=samples[0])
    after = min((s for s in samples if s[0] >= last), default=samples[-1])
    return after[1] - before[1]


def _busy_share(samples: list[tuple[float, int, int]], first: float, last: float) -> float:
    """Share of the machine's CPU time that was busy between ``first`` and ``last``."""
    inside = [sample for sample in samples if first <= sample[0] <= last]
    if len(inside) < 2:
        return float("nan")
    (_, busy_0, all_0), (_, busy_1, all_1) = inside[0], inside[-1]
    return (busy_1 - busy_0) / max(all_1 - all_0, 1)


def _wait_for_last_window(logs: list[Path], timeout_s: float) -> float:
    """Monotonic time when the workers' window count stopped growing (checked for 10 s)."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    pattern = re.compile(r"windows_written=(\d+) .*monotonic=([\d.]+)")
    while time.monotonic() < deadline:
        count, at = 0, 0.0
        for log in logs:
            matches = pattern.findall(log.read_text(errors="replace"))
            if matches:
                count += int(matches[-1][0])
                at = max(at, float(matches[-1][1]))
        if count != last_count:
            last_count, last_change = count, at
        elif count > 0 and time.monotonic() - last_change > 10:
            return last_change
        time.sleep(1)
    return float("nan")


def _peak_buffers(log: Path) -> tuple[int, int]:
    """The most traces in the trace buffers, and spans in the samplers', one worker logged."""
    found = BUFFERS.findall(log.read_text(errors="replace"))
    return max((int(t) for t, _ in found), default=0), max((int(s) for _, s in found), default=0)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
