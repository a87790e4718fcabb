"""Throughput of forwarding spans to Phoenix. Prints spans per second; asserts nothing.

Run from the project root:

    .venv/bin/python benchmarks/bench_phoenix.py [--spans 50000] [--phoenix-spans 3000]
        [--phoenix-url URL]

Without ``--phoenix-url`` it starts its own Phoenix (auth off, SQLite, a temporary folder) on
``--port`` (default 43206) and stops it at the end. The numbers:

1. the forwarder alone: SpanForwarder + PhoenixExporter into an in-process transport that
   accepts and "writes" at once (batching, protobuf encoding, gzip, bookkeeping, and with
   confirmation on, the polls that ask Phoenix what it wrote): the forwarder's own ceiling;
2. the worker's span path (decode + extract every message) with forwarding off, then on (the
   same, plus ``add()`` into the forwarder of 1): what forwarding costs the worker;
3. real Phoenix: spans per second Phoenix *wrote* through the forwarder (confirmation on: what
   offsets wait for; this is Phoenix's own ingest rate);
4. real Phoenix: spans per second Phoenix *accepted* (2xx, confirmation off: only queued).

The forwarder is not the bottleneck as long as 1 stays well above 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from processor.core.decoding import decode_request, extract_spans
from processor.core.semconv import ExtractionConfig
from processor.loadgen import Scenario, TraceGenerator
from processor.settings import StackSettings
from processor.sinks.phoenix import ExportResult, PhoenixExporter, RetryPolicy
from processor.stack import LocalStack
from processor.worker.phoenix_delivery import ForwardedBatch, SpanForwarder, SpanItem

CONFIG = ExtractionConfig()


def _payloads(spans: int, seed: int) -> list[bytes]:
    generator = TraceGenerator(
        Scenario(agents=10, trace_size=20, seed=seed), start_ms=time.time_ns() // 1_000_000
    )
    payloads: list[bytes] = []
    total = 0
    index = 0
    while total < spans:
        trace = generator.trace(index, end_ns=generator.end_ns_of(index))
        payloads.append(trace.payload)
        total += trace.span_count
        index += 1
    return payloads


def _decode(payload: bytes) -> list[SpanItem]:
    """A message's spans as the worker hands them to the forwarder."""
    decoded = extract_spans(decode_request(payload), CONFIG, payload=payload)
    return [(span.origin, span.pb) for span in decoded.spans]


async def _refuse(batch: ForwardedBatch, result: ExportResult) -> None:
    raise AssertionError(f"Phoenix refused a batch: HTTP {result.status} {result.detail}")


def _forwarder(
    url: str, *, confirm: bool, transport: httpx.AsyncBaseTransport | None = None
) -> SpanForwarder:
    exporter = PhoenixExporter(traces_url=url, timeout_s=60, transport=transport)
    return SpanForwarder(
        exporter,
        default_project="bench",
        on_failure=_refuse,
        batch_spans=2_000,
        batch_interval_s=1.0,
        max_in_flight=4,
        retry=RetryPolicy(initial_s=0.05, max_s=1.0),
        confirm_stored=confirm,
    )


async def _instant_200(request: httpx.Request) -> httpx.Response:
    """A Phoenix that accepts and writes everything at once (GraphQL: every span is there)."""
    if request.url.path == "/graphql":
        names = json.loads(request.content)["variables"]
        return httpx.Response(200, json={"data": {name: {"id": "x"} for name in names}})
    return httpx.Response(200)


async def _forward(forwarder: SpanForwarder, messages: Sequence[Sequence[SpanItem]]) -> float:
    """Seconds to add every message and drain (every span settled)."""
    started = time.perf_counter()
    for offset, spans in enumerate(messages):
        await forwarder.add(spans, partition=offset % 4, offset=offset // 4)
    await forwarder.drain(600)
    return time.perf_counter() - started


async def _worker_path(payloads: Sequence[bytes], forwarder: SpanForwarder | None) -> float:
    started = time.perf_counter()
    for offset, payload in enumerate(payloads):
        spans = _decode(payload)
        if forwarder is not None:
            await forwarder.add(spans, partition=offset % 4, offset=offset // 4)
    if forwarder is not None:
        await forwarder.drain(600)
    return time.perf_counter() - started


def _line(what: str, spans: int, seconds: float) -> None:
    print(f"{what:<58} {spans / seconds:>10,.0f} spans/s  ({spans} spans, {seconds:.2f} s)")


async def _run(args: argparse.Namespace, phoenix_url: str) -> None:
    payloads = _payloads(args.spans, seed=args.seed)
    messages = [_decode(p) for p in payloads]
    count = sum(len(m) for m in messages)
    print(f"{len(payloads)} messages, {count} spans (loadgen, ~20 spans per trace)")
    print(
        "forwarder: batches of 2,000 spans, 4 requests in flight, confirmation polled every 0.2 s\n"
    )

    fake = "http://in-process.invalid/v1/traces"
    for confirm in (False, True):
        forwarder = _forwarder(fake, confirm=confirm, transport=httpx.MockTransport(_instant_200))
        seconds = await _forward(forwarder, messages)
        _line(
            f"1. forwarder alone, in-process Phoenix, confirm {'on' if confirm else 'off'}",
            count,
            seconds,
        )

    off = await _worker_path(payloads, None)
    _line("2. worker span path, forwarding off (decode + extract)", count, off)
    for confirm in (False, True):
        forwarder = _forwarder(fake, confirm=confirm, transport=httpx.MockTransport(_instant_200))
        on = await _worker_path(payloads, forwarder)
        _line(
            f"   worker span path, forwarding on, confirm {'on' if confirm else 'off'}", count, on
        )

    url = f"{phoenix_url}/v1/traces"
    # Written first, on an idle Phoenix: accepted-only runs leave a backlog in its queue.
    written = [_decode(p) for p in _payloads(args.phoenix_spans, seed=args.seed + 1)]
    n = sum(len(m) for m in written)
    forwarder = _forwarder(url, confirm=True)
    seconds = await _forward(forwarder, written)
    _line("3. real Phoenix: spans written (confirm on)", n, seconds)
    _retries(forwarder)

    accepted = [_decode(p) for p in _payloads(args.phoenix_spans, seed=args.seed + 2)]
    n = sum(len(m) for m in accepted)
    forwarder = _forwarder(url, confirm=False)
    seconds = await _forward(forwarder, accepted)
    _line("4. real Phoenix: spans accepted, 2xx (confirm off)", n, seconds)
    _retries(forwarder)


def _retries(forwarder: SpanForwarder) -> None:
    stats = forwarder.stats
    if stats.retries_by_status or stats.resent_batches:
        print(
            f"   retried answers {stats.retries_by_status}, resent batches {stats.resent_batches}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=50_000, help="spans per in-process run")
    parser.add_argument(
        "--phoenix-spans", type=int, default=3_000, help="spans per run against Phoenix"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()) % 1_000_000 * 10)
    parser.add_argument("--phoenix-url", help="use this Phoenix instead of starting one")
    parser.add_argument("--port", type=int, default=43206, help="port of the Phoenix started")
    args = parser.parse_args()
    if args.phoenix_url:
        asyncio.run(_run(args, args.phoenix_url.rstrip("/")))
        return
    with tempfile.TemporaryDirectory(prefix="bench-phoenix-") as state:
        stack = LocalStack(
            StackSettings(
                dir=Path(state),
                phoenix_port=args.port,
                phoenix_grpc_port=args.port + 311,
                kafka_port=args.port + 86,
                kafka_controller_port=args.port + 87,
                mlflow_port=args.port + 494,
                start_timeout_s=600,
            )
        )
        started = time.perf_counter()
        url = stack.up(services=("phoenix",)).phoenix_url
        print(f"Phoenix started at {url} in {time.perf_counter() - started:.0f} s")
        try:
            asyncio.run(_run(args, url))
        finally:
            stack.down(services=("phoenix",))


if __name__ == "__main__":
    main()
