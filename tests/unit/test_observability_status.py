"""`trace-processor status`: the fleet view made from real scrapes of the worker's collector."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from processor import status
from processor.status import FleetView, Scrape, discover, parse_metrics, status_command
from processor.worker import observability
from processor.worker.observability import ConsumerPosition, RegisteredWorker, WorkerRegistry
from tests.unit.core.spanbuilder import T0_MS
from tests.unit.test_observability import collector_for, pipeline, trace_payload

SPANS, PARTIALS = "t.spans", "t.partials"


def _status(worker_id: str, *, ready: bool, problems: list[str]) -> dict:
    return {
        "worker_id": worker_id,
        "ready": ready,
        "problems": problems,
        "topics": {"spans": SPANS, "partials": PARTIALS},
        "assignment": {SPANS: [0, 1], PARTIALS: [0]},
        "recent_windows": [
            {
                "agent": "planner",
                "window_start_ms": T0_MS,
                "window_end_ms": T0_MS + 60_000,
                "written_at_ms": T0_MS + 67_000,
                "spans": 1234,
                "errors": 5,
            }
        ],
        "recent_problems": [
            {"ts_ms": T0_MS, "level": "error", "logger": "x", "message": "MLflow write failed"}
        ],
    }


def test_the_view_shows_rates_lag_windows_and_problems() -> None:
    async def scenario() -> tuple[str, str]:
        p = pipeline(max_traces=100)
        registry = CollectorRegistry()
        registry.register(
            collector_for(
                p,
                positions=lambda: [ConsumerPosition(SPANS, 0, 1_500, 1_000)],
                held=lambda topic, partition: 42,
            )
        )
        before = generate_latest(registry).decode()
        for trace in range(1, 11):  # 10 messages of 3 spans within the next 2 s
            await p.feed(0, trace_payload(trace, spans=3))
        return before, generate_latest(registry).decode()

    before, after = asyncio.run(scenario())
    url = "http://127.0.0.1:9464"
    t0 = T0_MS / 1000 + 70  # wall clock, shortly after the first window closed
    first = Scrape(url, t0, parse_metrics(before), _status("w-a", ready=True, problems=[]))
    second = Scrape(url, t0 + 2, parse_metrics(after), _status("w-a", ready=True, problems=[]))
    other = Scrape(
        "http://127.0.0.1:9465",
        t0 + 2,
        parse_metrics(after),
        _status("w-b", ready=False, problems=["mlflow: unreachable at http://m/health"]),
    )
    gone = Scrape("http://127.0.0.1:9466", t0 + 2, error="ConnectError: refused")
    view = FleetView()
    view.update([first], now_s=t0, source="test")
    console = Console(record=True, width=220)
    console.print(view.update([second, other, gone], now_s=t0 + 2, source="test"))
    text = console.export_text()
    assert "3 worker(s), 1 ready" in text
    assert "spans in 15/s" in text  # 30 spans in 2 s; w-b has no earlier scrape: no rate
    assert "lag 1,000" in text  # 500 on each answering worker
    assert "w-a" in text and "w-b" in text
    assert "0,1 / 0" in text  # partitions of the spans / partials topic
    assert "w-b: not ready: mlflow: unreachable at http://m/health" in text
    assert "http://127.0.0.1:9466: ConnectError: refused" in text
    assert "planner" in text and "1,234" in text and "7s" in text  # freshness 67 s - 60 s
    assert "MLflow write failed" in text


def test_discover_reads_the_registry_and_adds_urls(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.register(
        RegisteredWorker("w", "http://127.0.0.1:9464", os.getpid(), socket.gethostname(), "a", 1)
    )
    assert discover(registry, ["http://host-b:9464/", "http://127.0.0.1:9464"]) == [
        "http://127.0.0.1:9464",
        "http://host-b:9464",
    ]


def test_status_once_without_workers_says_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        status_command, ["--registry-dir", str(tmp_path), "--once", "--interval", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "0 worker(s)" in result.output
    assert "no worker found" in result.output


def test_the_view_reads_the_series_the_worker_writes() -> None:
    assert status.PREFIX == observability.PREFIX


def test_the_view_lists_the_alerts_firing_now() -> None:
    firing = {
        **_status("w-a", ready=True, problems=[]),
        "alerts_firing": [
            {
                "rule": "quiet-silent",
                "severity": "critical",
                "series": ["quiet"],
                "since_ms": T0_MS,
            },
            {
                "rule": "error-rate",
                "severity": "warning",
                "series": ["coder", "gpt-4o"],
                "since_ms": T0_MS + 60_000,
            },
        ],
    }
    calm = _status("w-b", ready=True, problems=[])
    console = Console(record=True, width=220)
    scrapes = [
        Scrape("http://127.0.0.1:9464", T0_MS / 1000, {}, firing),
        Scrape("http://127.0.0.1:9465", T0_MS / 1000, {}, calm),
    ]
    console.print(FleetView().update(scrapes, now_s=T0_MS / 1000, source="test"))
    text = console.export_text()
    assert "alerts firing" in text
    lines = [line for line in text.splitlines() if "quiet-silent" in line or "error-rate" in line]
    assert len(lines) == 2 and "quiet-silent" in lines[0]  # the oldest first
    assert "critical" in lines[0] and "w-a" in lines[0]
    assert "coder gpt-4o" in lines[1]
    console = Console(record=True, width=220)
    console.print(FleetView().update(scrapes[1:], now_s=T0_MS / 1000, source="test"))
    assert "alerts firing" not in console.export_text()  # none: no table
