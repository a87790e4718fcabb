"""`trace-processor loadgen`: publish demo agent traces to Kafka and write the expected rollups.

Two clocks. By default traces are published in real time at ``--rate`` traces/s, each ending
at the moment it is published. With ``--as-fast-as-possible`` the event times follow a
simulated clock at ``--rate`` traces/s from ``--start-ms`` (default: so that the traffic ends
now) and publishing goes as fast as Kafka accepts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

from processor.errors import ProcessorError, StackError
from processor.kafka_access import check_kafka_access
from processor.kafka_security import aiokafka_security_options
from processor.loadgen.late_order import LateReorderer
from processor.loadgen.pacing import realtime_traces
from processor.loadgen.publisher import PublishStats, publish_traces
from processor.loadgen.redelivery import Delivery, Redelivery, with_redeliveries
from processor.loadgen.scenario import PAYLOADS, Payloads, Scenario
from processor.loadgen.traces import GeneratedTrace, TraceGenerator
from processor.loadgen.truth import TruthBuilder
from processor.settings import load_kafka_client_settings


@click.command("loadgen")
@click.option(
    "--bootstrap",
    envvar="KAFKA_BOOTSTRAP_SERVERS",
    default="127.0.0.1:9092",
    show_default=True,
    help="Kafka brokers (env KAFKA_BOOTSTRAP_SERVERS).",
)
@click.option("--topic", default="otlp_spans", show_default=True, help="Topic to publish to.")
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Partitions of the topic if it has to be created.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Traces per second (of wall time, or of simulated time with --as-fast-as-possible).",
)
@click.option("--count", type=click.IntRange(min=0), help="Number of traces to publish.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of traffic (with --as-fast-as-possible: of simulated time).",
)
@click.option(
    "--as-fast-as-possible",
    is_flag=True,
    help="Simulated event times at --rate; publish as fast as Kafka takes it.",
)
@click.option(
    "--start-ms",
    type=click.IntRange(min=0),
    help="Simulated clock start, Unix ms [default: now - count/rate, so traffic ends now].",
)
@click.option("--agents", type=int, default=10, show_default=True, help="Specialist agents.")
@click.option("--trace-size", type=int, default=20, show_default=True, help="Mean spans/trace.")
@click.option(
    "--error-rate",
    type=float,
    default=0.05,
    show_default=True,
    help="Mean chance that one LLM/tool/retriever call fails.",
)
@click.option("--seed", type=click.IntRange(min=0), help="Random seed [default: a fresh one].")
@click.option("--service-name", default="agent-app", show_default=True, help="service.name.")
@click.option(
    "--latency-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply every span duration (0.1: traces 10x shorter in event time).",
)
@click.option(
    "--payloads",
    type=click.Choice(PAYLOADS),
    default="small",
    show_default=True,
    help="Text on spans: small (a root's question only) or realistic (0.3-4 KB inputs, "
    "outputs and messages on LLM and agent spans).",
)
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the exact expected rollups of what was published to this JSON file (calls "
    "without a reported cost priced from genai-prices' table, as the worker does by default).",
)
@click.option(
    "--window-size-ms",
    type=click.IntRange(min=1),
    envvar="PROCESSOR_WINDOW_SIZE_MS",
    default=60_000,
    show_default=True,
    help="Window size of the truth rollups (env PROCESSOR_WINDOW_SIZE_MS).",
)
@click.option(
    "--late-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of traces published after later traces (out of event-time order).",
)
@click.option(
    "--late-max-ms",
    type=click.IntRange(min=1),
    default=30_000,
    show_default=True,
    help="A late trace is published up to this much event time behind its place.",
)
@click.option(
    "--duplicates",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of traces of which spans are delivered twice, as an at-least-once producer "
    "does: the whole message again, spans repeated inside it, or sent again on their own.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar [default: when stdout is a terminal].",
)
def loadgen_command(
    bootstrap: str,
    topic: str,
    partitions: int,
    rate: float,
    count: int | None,
    duration: float | None,
    as_fast_as_possible: bool,
    start_ms: int | None,
    agents: int,
    trace_size: int,
    error_rate: float,
    seed: int | None,
    service_name: str,
    latency_scale: float,
    payloads: Payloads,
    truth_path: Path | None,
    window_size_ms: int,
    late_fraction: float,
    late_max_ms: int,
    duplicates: float,
    progress: bool | None,
) -> None:
    """Publish demo LLM agent traces (OTLP protobuf, one message per trace) to Kafka."""
    # A fresh seed by default: two runs into one topic must not repeat trace and span ids.
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    try:
        scenario = Scenario(
            agents=agents,
            trace_size=trace_size,
            error_rate=error_rate,
            seed=seed,
            service_name=service_name,
            latency_scale=latency_scale,
            payloads=payloads,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if as_fast_as_possible:
        if count is None:
            if duration is None:
                raise click.UsageError("--as-fast-as-possible needs --count or --duration")
            count = round(duration * rate)
        if start_ms is None:
            start_ms = time.time_ns() // 1_000_000 - round(count / rate * 1000)
        generator = TraceGenerator(scenario, start_ms=start_ms, rate=rate)
        source = _from_iterable(generator.generate(count))
        clock_note = f"simulated clock from {start_ms} ms"
    else:
        if start_ms is not None:
            raise click.UsageError("--start-ms only applies with --as-fast-as-possible")
        generator = TraceGenerator(scenario, start_ms=0, rate=rate)
        source = realtime_traces(
            generator,
            rate=rate,
            count=count,
            duration_s=duration,
            wall_clock_ns=time.time_ns,
            monotonic_s=time.monotonic,
            sleep=asyncio.sleep,
        )
        clock_note = "real time"
    click.echo(
        f"loadgen: seed {seed}, {agents} specialists, ~{trace_size} spans/trace, "
        f"{rate:g} traces/s ({clock_note}) -> {topic} at {bootstrap}",
        err=True,
    )
    run = _PublishRun(
        truth=TruthBuilder(window_size_ms),
        reorderer=LateReorderer(fraction=late_fraction, max_delay_ms=late_max_ms, seed=seed),
    )
    failure: StackError | None = None
    try:
        kafka = load_kafka_client_settings(kafka_bootstrap_servers=bootstrap)
        asyncio.run(check_kafka_access(kafka))
    except ProcessorError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        asyncio.run(
            publish_traces(
                with_redeliveries(
                    run.in_publish_order(source), Redelivery(fraction=duplicates, seed=seed)
                ),
                bootstrap=bootstrap,
                security=aiokafka_security_options(kafka),
                topic=topic,
                partitions=partitions,
                progress=sys.stdout.isatty() if progress is None else progress,
                expected_traces=count,
                on_sent=run.on_sent,
            )
        )
    except StackError as exc:
        failure = exc
    except KeyboardInterrupt:
        click.echo("loadgen: interrupted", err=True)
    truth = run.truth.build(
        generator={
            "seed": seed,
            "agents": agents,
            "trace_size": trace_size,
            "error_rate": error_rate,
            "service_name": service_name,
            "latency_scale": latency_scale,
            "rate": rate,
            "clock": "simulated" if as_fast_as_possible else "real-time",
            "start_ms": start_ms,
            "topic": topic,
            "late_fraction": late_fraction,
            "late_max_ms": late_max_ms,
            "duplicates": duplicates,
            "price_catalogue": _price_catalogue(),
        }
    )
    # Whatever reached Kafka gets its truth, even from a run that failed half-way; a run that
    # published nothing leaves an existing truth file alone.
    if truth_path is not None and (failure is None or truth.trace_count > 0):
        truth.write(truth_path)
        click.echo(f"truth: {truth_path} ({len(truth.rollups):,} rollups)", err=True)
    if failure is None or run.traces > 0:
        click.echo(run.stats().summary())
    if failure is not None:
        raise click.ClickException(str(failure)) from failure


@dataclass
class _PublishRun:
    """Publish order and truth of one run: a trace enters the truth once Kafka has it."""

    truth: TruthBuilder
    reorderer: LateReorderer[GeneratedTrace]
    delays_ms: dict[int, int] = field(default_factory=dict)
    started_s: float = field(default_factory=time.monotonic)
    traces: int = 0
    spans: int = 0
    error_spans: int = 0
    payload_bytes: int = 0

    def on_sent(self, delivery: Delivery) -> None:
        trace = delivery.trace
        if delivery.first:
            self.truth.add(trace)
            self.traces += 1
            delay_ms = self.delays_ms.pop(trace.index, 0)
            if delay_ms:
                self.truth.add_late(trace, delay_ms)
        self.truth.add_copies(trace, delivery.copies)
        self.spans += delivery.span_count
        self.error_spans += delivery.error_count
        self.payload_bytes += len(delivery.payload)

    async def in_publish_order(
        self, source: AsyncIterator[GeneratedTrace]
    ) -> AsyncIterator[GeneratedTrace]:
        async for trace in source:
            for released in self._note_delays(self.reorderer.push(trace)):
                yield released
        for released in self._note_delays(self.reorderer.drain()):
            yield released

    def _note_delays(self, released: list[tuple[GeneratedTrace, int]]) -> list[GeneratedTrace]:
        for trace, delay_ms in released:
            if delay_ms:
                self.delays_ms[trace.index] = delay_ms
        return [trace for trace, _ in released]

    def stats(self) -> PublishStats:
        return PublishStats(
            traces=self.traces,
            spans=self.spans,
            seconds=time.monotonic() - self.started_s,
            error_spans=self.error_spans,
            payload_bytes=self.payload_bytes,
        )


def _price_catalogue() -> str:
    """Which genai-prices priced the truth's estimated costs: a worker with another version
    may price some models otherwise."""
    try:
        return f"genai-prices {version('genai-prices')}"
    except PackageNotFoundError:
        return "genai-prices (version unknown)"


async def _from_iterable(traces: Iterable[GeneratedTrace]) -> AsyncIterator[GeneratedTrace]:
    for trace in traces:
        yield trace


if __name__ == "__main__":
    loadgen_command()
